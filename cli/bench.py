"""`xmag bench`: slides per minute of the whole pipeline, XMAG at 5x against UNI2-h and Phikon at 20x."""

from __future__ import annotations

from pathlib import Path

import typer

from xmag.cli.app import app


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
    features: bool = typer.Option(
        False, help="Instead: the embedding cache's speed-up and feature extraction's throughput, on the demo slide."
    ),
) -> None:
    """Slides per minute of the whole pipeline: XMAG at 5x against UNI2-h and Phikon at 20x, and a naive reference."""
    import os

    import torch

    from xmag.benchmarks.harness import plan_runs, require_plotting, run_benchmark, tile_limits
    from xmag.benchmarks.slides import ensure_benchmark_slides

    if features:
        from xmag.benchmarks.cache import extraction_throughput, run_cache_benchmark
        from xmag.cli.demo_model import demo_repository
        from xmag.demo import ensure_demo_slide

        slide = ensure_demo_slide(slides_dir / "demo").path
        repository = demo_repository(typer.echo)
        run_cache_benchmark(slide, repository, output_dir, say=typer.echo)
        extraction_throughput([slide], repository, output_dir, say=typer.echo)
        return
    require_plotting()
    names = [name.strip() for name in configs.split(",") if name.strip()]
    gpu = torch.cuda.is_available()
    limits = tile_limits(gpu, quick, max_tiles or [])
    plan_runs(names, [], scan_40x, limits)  # refuses an unknown configuration before slides are generated
    glasses = ensure_benchmark_slides(
        slides_dir, 1 if quick else slides, (20, 40) if scan_40x else (20,), quick=quick, progress=typer.echo
    )
    model_repo = None
    if "xmag" in names and not quick:
        # The product path is measured: the exported demo repository, built once by the export stage.
        from xmag.cli.demo_model import demo_repository

        model_repo = demo_repository(typer.echo)
    report = run_benchmark(
        plan_runs(names, glasses, scan_40x, limits),
        output_dir,
        batch_size=batch_size or (128 if gpu else 16),
        reader_threads=reader_threads or len(os.sched_getaffinity(0)),
        quick=quick,
        backend=backend,
        model_repo=model_repo,
        say=typer.echo,
    )
    typer.echo("")
    typer.echo((output_dir / "results.md").read_text())
    for path in report["files"]:
        typer.echo(f"wrote {path}")
