"""The `xmag` command: one entry point, a subcommand per job.

Subcommands translate arguments into calls of the core and its typed errors
into a message and exit status 2; they hold no logic of their own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import typer
from tqdm import tqdm

from xmag import __version__
from xmag.errors import XmagError

app = typer.Typer(
    name="xmag",
    help="XMAG: whole-slide-image inference with a 5x pathology encoder.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _advance(bar: tqdm, done: int, total: int) -> None:
    bar.total = total
    bar.update(done - bar.n)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"xmag {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """XMAG command line."""


@app.command("make-slide")
def make_slide(
    output: Path = typer.Argument(..., help="Where to write the slide (.svs or .tif)."),
    width_px: int = typer.Option(12_000, "--width", help="Level-0 width in pixels."),
    height_px: int = typer.Option(9_000, "--height", help="Level-0 height in pixels."),
    base_magnification: int = typer.Option(
        20, "--magnification", help="Scan magnification: 20 (0.5 µm/px) or 40 (0.25 µm/px)."
    ),
    levels: int | None = typer.Option(None, help="Pyramid levels (4x apart); default: until the top level is small."),
    lesions: int = typer.Option(0, help="Planted lesion regions (ground truth written beside the slide)."),
    seed: int = typer.Option(0, help="Random seed of the tissue layout and texture."),
    tissue: str = typer.Option("blobs", help="blobs, full (all tissue) or none (blank glass)."),
    background: str = typer.Option("white", help="white or grey scanner background."),
    faint: bool = typer.Option(False, help="Pale, weakly stained tissue."),
    mpp: bool = typer.Option(True, "--mpp/--no-mpp", help="Write the MPP into the metadata."),
    objective_power: bool = typer.Option(
        True, "--objective-power/--no-objective-power", help="Write the objective power."
    ),
) -> None:
    """Write a synthetic pyramidal JPEG-tiled TIFF with Aperio metadata (for demos and tests)."""
    from xmag.slide.synthetic import make_synthetic_slide

    try:
        with tqdm(total=0, unit="tile", desc="writing", file=sys.stderr, disable=None) as bar:
            slide = make_synthetic_slide(
                output,
                width_px=width_px,
                height_px=height_px,
                base_magnification=base_magnification,
                levels=levels,
                seed=seed,
                tissue=tissue,
                n_lesions=lesions,
                background=background,
                faint=faint,
                write_mpp=mpp,
                write_objective_power=objective_power,
                progress=lambda done, total: _advance(bar, done, total),
            )
    except (XmagError, ValueError, OSError) as error:
        _fail(error)
    typer.echo(
        f"wrote {slide.path} ({width_px} x {height_px} px at {base_magnification}x, {len(slide.level_sizes_px)} levels)"
    )
    typer.echo(f"ground truth: {slide.tissue_mask_path}, {slide.lesion_mask_path}")


@app.command()
def info(
    slide_path: Path = typer.Argument(..., help="Slide file."),
    backend: str = typer.Option("openslide", help="Reader: openslide (default, strict) or cucim (faster per core)."),
) -> None:
    """Print what a slide says about itself, as JSON."""
    from xmag.slide.reader import open_slide

    try:
        with open_slide(slide_path, backend=backend) as reader:
            facts = reader.info
    except (XmagError, ValueError) as error:
        _fail(error)
    typer.echo(
        json.dumps(
            {
                "backend": facts.backend,
                "vendor": facts.vendor,
                "level_dimensions": facts.level_dimensions,
                "level_downsamples": facts.level_downsamples,
                "mpp": facts.mpp,
                "objective_power": facts.objective_power,
                "associated_images": facts.associated_images,
            },
            indent=2,
        )
    )


@app.command()
def tiles(
    slide_path: Path = typer.Argument(..., help="Slide file."),
    target_mpp: float = typer.Option(2.0, help="Microns per pixel of the tiles (2.0 = 5x, 0.5 = 20x)."),
    tile_size_px: int = typer.Option(224, "--tile-size", help="Tile side in pixels at target_mpp."),
    min_tissue_fraction: float = typer.Option(0.5, "--min-tissue", help="Keep tiles at least this fraction tissue."),
    preview: Path | None = typer.Option(None, help="Write a PNG of the thumbnail with the tissue mask and tile grid."),
    fallback_mpp: float | None = typer.Option(None, "--mpp", help="Scan resolution to use if the slide states none."),
    backend: str = typer.Option("openslide", help="Reader: openslide (default, strict) or cucim (faster per core)."),
) -> None:
    """Detect tissue and plan the tile grid; print the tile count (and optionally draw it)."""
    from xmag.slide.reader import open_slide, resolve_mpp
    from xmag.slide.tiling import TilingSpec, plan_tile_grid
    from xmag.slide.tissue import tissue_mask_for_slide

    try:
        spec = TilingSpec(target_mpp=target_mpp, tile_size_px=tile_size_px, min_tissue_fraction=min_tissue_fraction)
        with open_slide(slide_path, backend=backend) as reader:
            slide_mpp = resolve_mpp(reader.info, fallback_mpp, str(slide_path))
            tissue, thumbnail = tissue_mask_for_slide(reader, slide_mpp)
            grid = plan_tile_grid(reader.info, slide_mpp, tissue, spec)
    except (XmagError, ValueError) as error:
        _fail(error)
    typer.echo(
        f"{len(grid)} tiles of {tile_size_px} px at {target_mpp} µm/px ({grid.tile_size_level0_px} level-0 px, "
        f"read from level {grid.read_level} at {grid.read_size_px} px); tissue {tissue.tissue_area_mm2:.2f} mm²"
    )
    if preview is not None:
        _write_grid_preview(preview, thumbnail, tissue, grid)
        typer.echo(f"preview: {preview}")


def _write_grid_preview(path: Path, thumbnail, tissue, grid) -> None:
    from PIL import Image, ImageDraw

    canvas = thumbnail.copy()
    canvas[tissue.mask] = (0.6 * canvas[tissue.mask] + 0.4 * np.array([0, 160, 0])).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    scale = tissue.level0_px_per_mask_px
    for x, y in grid.level0_coords:
        draw.rectangle(
            [
                x / scale,
                y / scale,
                (x + grid.tile_size_level0_px) / scale - 1,
                (y + grid.tile_size_level0_px) / scale - 1,
            ],
            outline=(0, 0, 255),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@app.command()
def classify(
    slide_path: Path | None = typer.Argument(None, help="Slide file; default: generate and classify the demo slide."),
    output_dir: Path = typer.Option(Path("out"), "--out", help="Where to write the heatmap PNG and the result JSON."),
    model_repo: Path | None = typer.Option(
        None, help="Verified model repository (xmag export); default: the demo repository, built on first use."
    ),
    weights: Path | None = typer.Option(
        None, help="Run a checkpoint in torch instead of a repository (encoder; heads if stored)."
    ),
    weights_format: str = typer.Option(
        "auto", help="Checkpoint format: auto, xmag, dinov2_hub, timm, xmag_release, hf_vit."
    ),
    encoder_config: str = typer.Option("xmag_vitb14", help="Architecture for non-xmag checkpoints."),
    backend: str = typer.Option(
        "openslide", help="Slide reader: openslide (default, strict) or cucim (faster per core)."
    ),
    batch_size: int = typer.Option(16, help="Tiles per encoder batch."),
    precision: str = typer.Option("fp32", help="With --weights: fp32, or bf16 (autocast; ~3x faster on CPUs)."),
    fallback_mpp: float | None = typer.Option(None, "--mpp", help="Scan resolution to use if the slide states none."),
) -> None:
    """Classify one slide in-process: tissue, 5x tiles, encoder, MIL heads, attention heatmap."""
    from xmag.export.demo import DEMO_REPOSITORY, ensure_demo_repository
    from xmag.demo import ensure_demo_slide
    from xmag.pipeline import classify_slide

    try:
        if slide_path is None:
            slide_path = ensure_demo_slide(output_dir / "demo").path
            typer.echo(f"demo slide: {slide_path} (generated; 20x, one planted lesion)")
        if weights is not None:
            encoder, heads, provenance = _runtimes_from_checkpoint(weights, weights_format, encoder_config, precision)
        else:
            if model_repo is None:
                if not DEMO_REPOSITORY.exists():
                    typer.echo(f"building the demo model repository in {DEMO_REPOSITORY} (first run only, ~30 s)")
                model_repo = ensure_demo_repository(DEMO_REPOSITORY)
            encoder, heads, provenance = _runtimes_from_repository(model_repo)
        typer.echo(f"model: {provenance['model']}; encoder runs on {encoder.description}")
        if provenance["notice"]:
            typer.secho(provenance["notice"], fg=typer.colors.YELLOW)
        with tqdm(total=0, unit="tile", desc="encoding", file=sys.stderr, disable=None) as bar:
            result = classify_slide(
                str(slide_path),
                encoder,
                heads,
                backend=backend,
                batch_size=batch_size,
                fallback_mpp=fallback_mpp,
                on_event=lambda event: _advance(bar, event.tiles_done, event.tiles_total),
            )
        _print_result(result)
        written = _write_result(result, output_dir, Path(slide_path).stem, provenance)
    except (XmagError, ValueError, OSError) as error:
        _fail(error)
    for path in written:
        typer.echo(f"{'result' if path.suffix == '.json' else 'heatmap'}: {path}")


def _runtimes_from_repository(model_repo: Path):
    from xmag.demo import DEMO_WEIGHTS_NOTICE
    from xmag.inference import runtimes_from_repository
    from xmag.model_repo import load_model_repository

    repository = load_model_repository(model_repo)
    encoder, heads = runtimes_from_repository(repository)
    manifest = repository.manifest
    provenance = {
        "model": f"{manifest.model_name} v{manifest.model_version} ({manifest.provenance.kind})",
        "repository": str(model_repo),
        **manifest.provenance.model_dump(),
        "notice": DEMO_WEIGHTS_NOTICE if manifest.provenance.kind == "untrained-demo" else "",
    }
    return encoder, heads, provenance


def _runtimes_from_checkpoint(weights: Path, weights_format: str, encoder_config: str, precision: str):
    from xmag.demo import DEMO_HEADS_NOTICE, demo_heads
    from xmag.inference import TorchSlideHeads, TorchTileEncoder
    from xmag.model_repo import sha256_of
    from xmag.models.checkpoints import is_xmag_checkpoint, load_encoder, load_xmag_checkpoint
    from xmag.models.encoder import TileEncoder

    if weights_format in ("auto", "xmag") and is_xmag_checkpoint(weights):
        checkpoint = load_xmag_checkpoint(weights)  # encoder and heads from one read
        vit, stored_heads = checkpoint.vit, checkpoint.heads
    else:
        vit, stored_heads = load_encoder(weights, weights_format, encoder_config), None
    encoder = TorchTileEncoder(TileEncoder(vit), precision)
    provenance = {
        "model": f"checkpoint {weights.name}",
        "kind": "checkpoint",
        "source_checkpoint": weights.name,
        "source_sha256": sha256_of(weights),
        "notice": "" if stored_heads is not None else DEMO_HEADS_NOTICE,
    }
    heads = TorchSlideHeads(stored_heads if stored_heads is not None else demo_heads(encoder.embed_dim))
    return encoder, heads, provenance


@app.command()
def demo(
    output_dir: Path = typer.Option(
        Path("out"), "--out", help="Where to write the demo slide, heatmaps, GeoJSON and result."
    ),
) -> None:
    """The main job: start the service on the demo repository, classify the demo slide via POST /v1/classify."""
    from xmag.service.demo import run_demo

    try:
        written = run_demo(output_dir, typer.echo)
    except (XmagError, OSError) as error:
        _fail(error)
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
def serve(
    model_repo: Path | None = typer.Option(
        None, help="Verified model repository; default: the demo repository. [env XMAG_MODEL_REPO]"
    ),
    slide_root: list[Path] | None = typer.Option(
        None,
        "--slide-root",
        help="Directory slides may be read from (repeatable); default: out/demo. [env XMAG_SLIDE_ROOTS, comma-separated]",
    ),
    host: str | None = typer.Option(None, help="Address to listen on; default 127.0.0.1 (loopback). [env XMAG_HOST]"),
    port: int | None = typer.Option(None, help="REST port; default 8000. [env XMAG_PORT]"),
    grpc: bool | None = typer.Option(
        None, "--grpc/--no-grpc", help="Serve gRPC beside REST (default). [env XMAG_GRPC]"
    ),
    grpc_port: int | None = typer.Option(None, help="gRPC port; default 50051. [env XMAG_GRPC_PORT]"),
    reader_backend: str | None = typer.Option(None, help="Slide reader: openslide or cucim. [env XMAG_READER_BACKEND]"),
    encoder_backend: str | None = typer.Option(
        None,
        help="auto (fastest correct, measured at start), torch, onnxruntime, tensorrt or triton. [env XMAG_ENCODER_BACKEND]",
    ),
    precision: str | None = typer.Option(None, help="auto, fp32, bf16, fp16 or int8. [env XMAG_PRECISION]"),
    triton_url: str | None = typer.Option(
        None, help="host:port of Triton's gRPC endpoint, for --encoder-backend triton. [env XMAG_TRITON_URL]"
    ),
    triton_model: str | None = typer.Option(
        None,
        help="The encoder's model name in Triton; default: the repository's fp32 ONNX encoder. [env XMAG_TRITON_MODEL]",
    ),
    triton_timeout_s: float | None = typer.Option(
        None, help="Longest Triton may take to answer one batch; default 30. [env XMAG_TRITON_TIMEOUT_S]"
    ),
    triton_ready_timeout_s: float | None = typer.Option(
        None,
        help="How long Triton may take at start to have the model ready; default 120. [env XMAG_TRITON_READY_TIMEOUT_S]",
    ),
    max_batch_size: int | None = typer.Option(None, help="Most tiles per encoder batch, across slides; default 64."),
    read_batch_size: int | None = typer.Option(None, help="Tiles a slide hands the encoder at a time; default 16."),
    max_batch_wait_ms: float | None = typer.Option(
        None, help="How long a partial batch waits for more tiles; default 5."
    ),
    reader_threads: int | None = typer.Option(None, help="Decoding threads per slide; default 2."),
    max_concurrent_slides: int | None = typer.Option(None, help="Slides processed at once; default 4."),
    max_queued_slides: int | None = typer.Option(
        None, help="Slides that may wait beyond those (more get 429); default 32."
    ),
    max_tiles_per_slide: int | None = typer.Option(None, help="Larger slides get 413; default 20000."),
    request_timeout_s: float | None = typer.Option(
        None, help="Longest a slide may take, queueing included; default 600."
    ),
    result_cache_size: int | None = typer.Option(
        None, help="Recent results whose heatmaps can be fetched; default 32."
    ),
    api_key: list[str] | None = typer.Option(
        None,
        "--api-key",
        help="Require 'Authorization: Bearer <key>' (repeatable). Prefer XMAG_API_KEYS, which ps does not show.",
    ),
    log_level: str | None = typer.Option(None, help="debug, info, warning or error. [env XMAG_LOG_LEVEL]"),
) -> None:
    """Serve POST /v1/classify (REST) and xmag.v1.SlideClassifier (gRPC) on one batched engine; flags have XMAG_* variables."""
    import logging

    import uvicorn
    from pydantic import ValidationError

    from xmag.service.rest import create_app
    from xmag.service.settings import ServiceSettings

    given = {
        "model_repo": model_repo,
        "slide_roots": slide_root or None,
        "host": host,
        "port": port,
        "grpc": grpc,
        "grpc_port": grpc_port,
        "reader_backend": reader_backend,
        "encoder_backend": encoder_backend,
        "precision": precision,
        "triton_url": triton_url,
        "triton_model": triton_model,
        "triton_timeout_s": triton_timeout_s,
        "triton_ready_timeout_s": triton_ready_timeout_s,
        "max_batch_size": max_batch_size,
        "read_batch_size": read_batch_size,
        "max_batch_wait_ms": max_batch_wait_ms,
        "reader_threads": reader_threads,
        "max_concurrent_slides": max_concurrent_slides,
        "max_queued_slides": max_queued_slides,
        "max_tiles_per_slide": max_tiles_per_slide,
        "request_timeout_s": request_timeout_s,
        "result_cache_size": result_cache_size,
        "api_keys": api_key or None,
        "log_level": log_level,
    }
    try:
        settings = ServiceSettings(**{name: value for name, value in given.items() if value is not None})
    except ValidationError as error:
        _fail(ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.model_repo is None:
        from xmag.export.demo import DEMO_REPOSITORY
        from xmag.service.settings import DEMO_SLIDE_ROOT
        from xmag.demo import ensure_demo_slide

        if DEMO_SLIDE_ROOT in settings.slide_roots and not (DEMO_SLIDE_ROOT / "demo_slide.svs").exists():
            ensure_demo_slide(DEMO_SLIDE_ROOT)
        if not DEMO_REPOSITORY.exists():
            typer.echo(f"building the demo model repository in {DEMO_REPOSITORY} (first run only, ~30 s)")
    missing = [str(root) for root in settings.slide_roots if not root.is_dir()]
    if missing:
        _fail(ValueError(f"slide root(s) {missing} do not exist or are not directories"))
    if settings.model_repo is not None and not (settings.model_repo / "manifest.json").is_file():
        # Caught here for a clear exit; a repository that is there but damaged is reported by /readyz.
        _fail(
            ValueError(
                f"{settings.model_repo} is not a model repository (no manifest.json); build one with `xmag export`"
            )
        )
    grpc_note = f", gRPC on {settings.host}:{settings.grpc_port}" if settings.grpc else ""
    typer.echo(
        f"serving REST on http://{settings.host}:{settings.port}{grpc_note} (slide roots: "
        f"{', '.join(map(str, settings.slide_roots))}; API keys: {'required' if settings.api_keys else 'none'}); "
        "GET /readyz turns 200 once the model is warm"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s),
    )


@app.command("lis-client")
def lis_client(
    folder: Path = typer.Argument(..., help="Folder of slides (searched recursively)."),
    target: str = typer.Option("127.0.0.1:50051", help="The service's gRPC address, host:port."),
    output_dir: Path = typer.Option(Path("results"), "--out", help="Where to write one JSON per slide."),
    server_folder: str | None = typer.Option(None, help="Where the service sees FOLDER; default: the same path."),
    api_key: str | None = typer.Option(
        None, envvar="XMAG_API_KEY", help="API key, sent as 'authorization: Bearer'. [env XMAG_API_KEY]"
    ),
    task: list[str] | None = typer.Option(None, "--task", help="Task to run (repeatable); default: every task."),
    return_attention: bool = typer.Option(False, help="Include tile coordinates and attention in each result."),
    timeout_s: float | None = typer.Option(None, help="Give up on a slide after this many seconds."),
) -> None:
    """Stream a folder of slides through gRPC ClassifyMany; write each result (or error) as it arrives.

    Exit status: 0 when every slide was classified, 1 when some failed (their
    JSON says why), 2 when the stream could not run.
    """
    from xmag.service.lis_client import classify_folder, find_slides

    try:
        with tqdm(
            total=len(find_slides(folder)), unit="slide", desc="classifying", file=sys.stderr, disable=None
        ) as bar:
            summary = classify_folder(
                target,
                folder,
                output_dir,
                server_folder=server_folder,
                api_key=api_key,
                tasks=task or None,
                return_attention=return_attention,
                timeout_s=timeout_s,
                on_answer=lambda _: bar.update(1),
            )
    except (XmagError, OSError) as error:
        _fail(error)
    typer.echo(f"{len(summary.classified)} classified, {len(summary.failed)} failed; results in {output_dir}")
    for correlation_id in summary.failed:
        typer.echo(f"  failed: {correlation_id}")
    if summary.failed:
        raise typer.Exit(code=1)


@app.command()
def bench(
    output_dir: Path = typer.Option(
        Path("out/bench"), "--out", help="Where to write results.json, results.md and the plots."
    ),
    slides: int = typer.Option(2, help="Benchmark glasses (each generated once, ~554 tiles at 5x, ~6,260 at 20x)."),
    configs: str = typer.Option(
        "xmag,naive_xmag,uni2h,phikon", help="Configurations, comma-separated: xmag, naive_xmag, uni2h, phikon."
    ),
    scan_40x: bool = typer.Option(True, help="Also run XMAG on the same glasses scanned at 40x."),
    max_tiles: list[str] | None = typer.Option(
        None,
        "--max-tiles",
        help="NAME=N: encode the first N tiles per slide and extrapolate (NAME=all: every tile). "
        "Defaults without a GPU: uni2h=24, phikon=96, naive_xmag=96; with one: uni2h=2048, naive_xmag=512.",
    ),
    batch_size: int | None = typer.Option(None, help="Tiles per encoder batch; default 16 on a CPU, 128 on a GPU."),
    reader_threads: int | None = typer.Option(None, help="Decoding threads per slide; default: the CPU cores."),
    backend: str = typer.Option("openslide", help="Slide reader of our pipeline: openslide or cucim."),
    slides_dir: Path = typer.Option(Path("out/bench_slides"), help="Cache of the generated benchmark slides."),
    quick: bool = typer.Option(False, help="Tiny models on one small slide: checks the harness in CI, not the speed."),
) -> None:
    """Slides per minute of the whole pipeline: XMAG at 5x against UNI2-h and Phikon at 20x, and a naive reference."""
    import os

    import torch

    from xmag.benchmarks.harness import CONFIGS, BenchmarkError, BenchRun, run_benchmark
    from xmag.benchmarks.slides import ensure_benchmark_slides

    names = [name.strip() for name in configs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        _fail(ValueError(f"unknown configuration(s) {unknown}; choose from {sorted(CONFIGS)}"))
    gpu = torch.cuda.is_available()
    limits: dict[str, int | None] = (
        {"uni2h": 2048, "naive_xmag": 512} if gpu else {"uni2h": 24, "phikon": 96, "naive_xmag": 96}
    )
    if quick:
        limits = {"uni2h": 8, "phikon": 8, "naive_xmag": 8}
    for item in max_tiles or []:
        name, _, value = item.partition("=")
        if name not in CONFIGS or not (value == "all" or (value.isdigit() and int(value) > 0)):
            _fail(ValueError(f"--max-tiles takes NAME=N or NAME=all with NAME in {sorted(CONFIGS)}, got {item!r}"))
        limits[name] = None if value == "all" else int(value)
    try:
        glasses = ensure_benchmark_slides(
            slides_dir, 1 if quick else slides, (20, 40) if scan_40x else (20,), quick=quick, progress=typer.echo
        )
    except (XmagError, OSError, ValueError) as error:
        _fail(error)
    at = {
        magnification: tuple(str(g.path) for g in glasses if g.base_magnification == magnification)
        for magnification in (20, 40)
    }
    runs = [BenchRun(name, at[20], 20, limits.get(name)) for name in names]
    if scan_40x and "xmag" in names:
        runs.insert(names.index("xmag") + 1, BenchRun("xmag", at[40], 40, limits.get("xmag")))
    try:
        report = run_benchmark(
            runs,
            output_dir,
            batch_size=batch_size or (128 if gpu else 16),
            reader_threads=reader_threads or len(os.sched_getaffinity(0)),
            quick=quick,
            backend=backend,
            say=typer.echo,
        )
    except (BenchmarkError, XmagError, OSError) as error:
        _fail(error)
    typer.echo("")
    typer.echo((output_dir / "results.md").read_text())
    for path in report["files"]:
        typer.echo(f"wrote {path}")


@app.command("import-weights")
def import_weights_command(
    source: Path = typer.Argument(
        ..., help="Official weight file (XMAG release, DINOv2 hub, UNI2-h timm .bin, Phikon)."
    ),
    output: Path = typer.Argument(..., help="The XMAG checkpoint to write (.safetensors)."),
    weights_format: str = typer.Option("auto", "--format", help="auto, xmag_release, dinov2_hub, timm, hf_vit, xmag."),
    architecture: str | None = typer.Option(None, help="xmag_vitb14, uni2h, phikon_vitb16, ...; default by format."),
    heads_from: Path | None = typer.Option(None, help="Copy the slide heads stored in this XMAG checkpoint."),
) -> None:
    """Convert an official weight file into an XMAG checkpoint, recording its sha256 as provenance."""
    from xmag.export.import_weights import import_weights
    from xmag.models.checkpoints import load_slide_heads

    try:
        heads = load_slide_heads(heads_from) if heads_from is not None else None
        used = import_weights(source, output, fmt=weights_format, architecture=architecture, heads=heads)
    except (XmagError, ValueError, OSError) as error:
        _fail(error)
    typer.echo(f"wrote {output} (read {source.name} as {used})")


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="XMAG checkpoint (encoder + heads), e.g. from import-weights."),
    repo: Path = typer.Option(Path("model_repo/current"), help="Model repository to write (replaced when complete)."),
    model_name: str | None = typer.Option(None, help="Triton model name; default: the architecture."),
    version: int = typer.Option(1, help="Model version directory."),
    max_batch_size: int = typer.Option(256, help="Triton max_batch_size of the encoder."),
    int8: bool = typer.Option(False, help="Also write a dynamically quantised int8 encoder for CPUs."),
    tensorrt: bool = typer.Option(False, help="Also build a TensorRT FP16 engine for this machine's GPU."),
    trt_opt_batch: int = typer.Option(64, help="TensorRT optimisation profile: optimal batch."),
    trt_max_batch: int = typer.Option(256, help="TensorRT optimisation profile: largest batch."),
) -> None:
    """Export ONNX (and optionally int8 and TensorRT) artifacts, Triton configs and a manifest with sha256 sums."""
    from xmag.export.repository import ExportOptions, export_model_repository

    options = ExportOptions(
        version=version,
        max_batch_size=max_batch_size,
        int8=int8,
        tensorrt=tensorrt,
        tensorrt_opt_batch=trt_opt_batch,
        tensorrt_max_batch=trt_max_batch,
    )
    try:
        manifest = export_model_repository(checkpoint, repo, options, model_name=model_name)
    except (XmagError, ValueError, OSError) as error:
        _fail(error)
    _print_manifest(repo, manifest)


@app.command("verify-repo")
def verify_repo(
    repo: Path = typer.Argument(..., help="Model repository directory."),
    measure: bool = typer.Option(
        True, help="Run every encoder backend this machine has on a probe batch, as `xmag serve` does."
    ),
) -> None:
    """Check every file of a model repository against its manifest and show which encoder backend would run here."""
    from xmag.inference import select_encoder_runtime
    from xmag.model_repo import load_model_repository

    try:
        repository = load_model_repository(repo)
        _print_manifest(repo, repository.manifest)
        if not measure:
            typer.echo("verified")
            return
        selection = select_encoder_runtime(repository)
    except XmagError as error:
        _fail(error)
    typer.echo("verified; encoder backends measured on this machine (the service chooses the same way):")
    for measured in selection.measurements:
        speed = f"{measured.tiles_per_s:.1f} tiles/s" if measured.tiles_per_s is not None else "not run"
        cosine = (
            f", cosine {measured.min_cosine_vs_torch_fp32:.5f}" if measured.min_cosine_vs_torch_fp32 is not None else ""
        )
        note = f" ({measured.note})" if measured.note else ""
        typer.echo(f"  {'*' if measured.chosen else ' '} {measured.description}: {speed}{cosine}{note}")


def _print_manifest(repo: Path, manifest) -> None:
    typer.echo(f"{repo}: {manifest.model_name} v{manifest.model_version}, {manifest.provenance.kind} weights")
    for artifact in manifest.artifacts:
        parity = artifact.parity
        if parity:
            measured = f"max abs {parity.max_abs_error:.2g}, min cosine {parity.min_cosine:.6f}"
        else:
            measured = "the reference" if artifact.runtime == "torch" else "no parity"
        typer.echo(
            f"  {artifact.name}: {artifact.role}{' ' + artifact.task if artifact.task else ''}, {artifact.runtime} "
            f"{artifact.precision}, {measured}{'' if artifact.usable else ' (NOT USABLE: parity below bound)'}"
        )


def _print_result(result) -> None:
    facts = result.facts
    typer.echo(
        f"slide: {facts.width_px} x {facts.height_px} px, {facts.mpp:g} µm/px ({facts.base_magnification:g}x), "
        f"{facts.vendor}, read via {facts.reader_backend} from level {facts.read_level}; "
        f"{facts.tile_count} tiles at 5x; tissue {facts.tissue_area_mm2:.1f} mm²"
    )
    for task, prediction in result.predictions.items():
        probabilities = ", ".join(f"{name} {p:.3f}" for name, p in prediction.probabilities.items())
        typer.echo(f"{task}: {prediction.label}  ({probabilities})")
    typer.echo("timings: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.timings_s.items()))


def _write_result(result, output_dir: Path, stem: str, provenance: dict) -> list[Path]:
    """One heatmap PNG per task and one result JSON; returns their paths."""
    from xmag.heatmap import render_attention_heatmap

    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task, prediction in result.predictions.items():
        heatmap_path = output_dir / f"{stem}.{task}.heatmap.png"
        render_attention_heatmap(
            result.thumbnail,
            result.tissue.level0_px_per_mask_px,
            result.level0_coords,
            result.tile_size_level0_px,
            prediction.attention,
        ).save(heatmap_path)
        written.append(heatmap_path)
    result_path = output_dir / f"{stem}.result.json"
    result_path.write_text(
        json.dumps(
            {
                "slide": result.facts.__dict__,
                "model": provenance,
                "predictions": {
                    task: {"label": p.label, "probabilities": p.probabilities, "attention": p.attention.tolist()}
                    for task, p in result.predictions.items()
                },
                "tile_size_level0_px": result.tile_size_level0_px,
                "level0_coords": result.level0_coords.tolist(),
                "timings_s": result.timings_s,
            },
            indent=1,
        )
    )
    written.append(result_path)
    return written
