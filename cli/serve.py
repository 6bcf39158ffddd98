"""Service commands: the main job (`xmag demo`), the service (`xmag serve`), the LIS client (`xmag lis-client`).

`xmag serve` is where the faces meet: without a model repository it serves the
demo repository, which the export stage builds on the service's loader thread
on first start, while `/healthz` already answers.
"""

from __future__ import annotations

from pathlib import Path

import typer

from xmag.cli.app import app, progress_bar


@app.command()
def demo(
    output_dir: Path = typer.Option(
        Path("out"), "--out", help="Where to write the demo slide, heatmaps, GeoJSON and result."
    ),
) -> None:
    """The main job: train the demo head on synthetic slides, export it, serve it, classify the demo slide over REST.

    Steps already done (slides, feature files, the export) are reused on a rerun.
    """
    from xmag.cli.demo_model import demo_repository
    from xmag.service.demo import run_demo

    repository = demo_repository(typer.echo, output_dir / "demo")
    for path in run_demo(output_dir, repository, typer.echo):
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
    embedding_cache_dir: Path | None = typer.Option(
        None,
        help="Keep classified slides' embeddings here; a repeat request runs only the heads. [env XMAG_EMBEDDING_CACHE_DIR]",
    ),
    embedding_cache_max_bytes: int | None = typer.Option(
        None, help="Largest the embedding cache may grow; default 10 GiB. [env XMAG_EMBEDDING_CACHE_MAX_BYTES]"
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

    from xmag.service.rest import create_app, run_service
    from xmag.service.settings import DEMO_SLIDE_ROOT, ServiceSettings

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
        "embedding_cache_dir": embedding_cache_dir,
        "embedding_cache_max_bytes": embedding_cache_max_bytes,
        "result_cache_size": result_cache_size,
        "api_keys": api_key or None,
        "log_level": log_level,
    }
    settings = ServiceSettings(**{name: value for name, value in given.items() if value is not None})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.model_repo is not None:
        run_service(create_app(settings), settings, typer.echo)
        return

    from xmag.cli.demo_model import demo_repository
    from xmag.demo import ensure_demo_slide
    from xmag.export.demo import DEMO_REPOSITORY
    from xmag.service.loading import load_engine

    if DEMO_SLIDE_ROOT in settings.slide_roots and not (DEMO_SLIDE_ROOT / "demo_slide.svs").exists():
        ensure_demo_slide(DEMO_SLIDE_ROOT)
    if not DEMO_REPOSITORY.exists():
        typer.echo(f"building the demo model in {DEMO_REPOSITORY}: its head is trained on synthetic slides first")
    settings = settings.model_copy(update={"model_repo": DEMO_REPOSITORY})

    def load_demo_engine(settings, metrics):
        demo_repository(typer.echo)
        return load_engine(settings, metrics)

    run_service(create_app(settings, load_demo_engine), settings, typer.echo, require_manifest=False)


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

    with progress_bar("slide", "classifying", total=len(find_slides(folder))) as bar:
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
    typer.echo(f"{len(summary.classified)} classified, {len(summary.failed)} failed; results in {output_dir}")
    for correlation_id in summary.failed:
        typer.echo(f"  failed: {correlation_id}")
    if summary.failed:
        raise typer.Exit(code=1)
