"""`xmag classify`: one slide in-process (tissue, 5x tiles, encoder, MIL heads), its result and heatmap files."""

from __future__ import annotations

import uuid
from pathlib import Path

import typer

from xmag.cli.app import advance, app, progress_bar


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
    from xmag.demo import ensure_demo_slide
    from xmag.loading import load_checkpoint_model, load_repository_model
    from xmag.pipeline import classify_slide
    from xmag.result_files import write_result_files
    from xmag.result_schema import classify_result

    if slide_path is None:
        slide_path = ensure_demo_slide(output_dir / "demo").path
        typer.echo(f"demo slide: {slide_path} (generated; 20x, one planted lesion)")
    if weights is not None:
        model = load_checkpoint_model(weights, weights_format, encoder_config, precision)
    else:
        if model_repo is None:
            from xmag.cli.demo_model import demo_repository

            model_repo = demo_repository(typer.echo)
        model = load_repository_model(model_repo)
    info = model.info
    typer.echo(f"model: {info.name} v{info.version} ({info.kind}); encoder runs on {info.encoder}")
    if info.notice:
        typer.secho(info.notice, fg=typer.colors.YELLOW)
    with progress_bar("tile", "encoding") as bar:
        result = classify_slide(
            str(slide_path),
            model.encoder,
            model.heads,
            spec=model.spec,
            backend=backend,
            batch_size=batch_size,
            fallback_mpp=fallback_mpp,
            on_event=lambda event: advance(bar, event.tiles_done, event.tiles_total),
        )
    document = classify_result(
        result, info, model.spec, result_id=uuid.uuid4().hex, timings_s=result.timings_s, return_attention=True
    )
    facts = document.slide
    typer.echo(
        f"slide: {facts.width_px} x {facts.height_px} px, {facts.mpp:g} µm/px ({facts.base_magnification:g}x), "
        f"{facts.vendor}, read via {facts.reader_backend} from level {facts.read_level}; "
        f"{facts.tile_count} tiles at {facts.target_mpp:g} µm/px; tissue {facts.tissue_area_mm2:.1f} mm²"
    )
    for task, prediction in document.predictions.items():
        probabilities = ", ".join(f"{name} {p:.3f}" for name, p in prediction.probabilities.items())
        typer.echo(f"{task}: {prediction.label}  ({probabilities})")
    typer.echo("timings: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.timings_s.items()))
    for path in write_result_files(document, result, output_dir, Path(slide_path).stem):
        kind = {".json": "result", ".png": "heatmap", ".geojson": "attention"}[path.suffix]
        typer.echo(f"{kind}: {path}")
