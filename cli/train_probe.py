"""`xmag train probe`: a linear probe of an encoder on labelled tiles (UNI's evaluation); see training/probe.py."""

from __future__ import annotations

from pathlib import Path

import typer

from xmag.cli.app import advance, progress_bar
from xmag.cli.train import train_app


@train_app.command("probe")
def probe(
    source: Path = typer.Argument(
        ...,
        help="A CSV of tiles (slide, x, y, label[, split]) or an image folder (<label>/*, {train,val,test}/<label>/*).",
    ),
    output_dir: Path = typer.Option(..., "--out", help="Where to write probe.json, probe.md and predictions.csv."),
    model_repo: Path | None = typer.Option(None, help="Verified model repository whose encoder to probe."),
    weights: Path | None = typer.Option(None, help="Or a checkpoint, run in torch."),
    weights_format: str = typer.Option(
        "auto", help="Checkpoint format: auto, xmag, dinov2_hub, timm, xmag_release, hf_vit."
    ),
    encoder_config: str = typer.Option(
        "xmag_vitb14", help="Architecture of a non-xmag checkpoint; uni2h and phikon_vitb16 tile at 20x."
    ),
    encoder_backend: str = typer.Option(
        "auto", help="With --model-repo: auto (fastest correct), torch, onnxruntime, tensorrt."
    ),
    precision: str = typer.Option(
        "auto", help="With --model-repo: auto, fp32, bf16, fp16, int8; with --weights: fp32 or bf16."
    ),
    slide_dir: Path | None = typer.Option(None, help="Where the CSV's slide ids find their slide files."),
    spider_context: bool = typer.Option(
        False, help="Rows are 20x patches: embed the encoder's tile centred on each (the paper's SPIDER protocol)."
    ),
    patch_size_level0: int | None = typer.Option(
        None, help="With --spider-context: the patches' side in level-0 px, where the CSV has no such column."
    ),
    classes: str | None = typer.Option(None, help="Class order, comma-separated (the grades' order for --ordinal)."),
    ordinal: bool = typer.Option(False, help="Graded labels: also report quadratic kappa."),
    c_values: str | None = typer.Option(
        None, help="Comma-separated C values to choose from (default: 45 log-spaced in 1e-6..1e5)."
    ),
    max_iter: int = typer.Option(1000, help="L-BFGS iterations per fit."),
    seed: int = typer.Option(0, help="Seed of the split by slide, where the input gives none."),
    reader_backend: str = typer.Option("openslide", help="Slide reader: openslide or cucim."),
    batch_size: int = typer.Option(32, help="Tiles per encoder batch."),
    reader_threads: int = typer.Option(2, help="Decoding threads per slide."),
    fallback_mpp: float | None = typer.Option(None, "--mpp", help="Scan resolution to use if a slide states none."),
) -> None:
    """Fit a logistic-regression probe on frozen embeddings; C chosen on validation, metrics on test."""
    from xmag.features import EncoderIdentity
    from xmag.loading import load_checkpoint_model, load_repository_model
    from xmag.training.probe import (
        C_GRID,
        class_names_of,
        embed_probe_tiles,
        fit_linear_probe,
        probe_parts,
        probe_table,
        read_probe_source,
        resized_images_line,
        slides_in_several_parts,
        split_counts,
        split_probe_tiles,
        write_probe_outputs,
    )

    if (model_repo is None) == (weights is None):
        raise ValueError("give the encoder as exactly one of --model-repo or --weights")
    c_grid = _numbers(c_values, "--c-values") if c_values else C_GRID
    tiles = read_probe_source(source, slide_dir, spider_context=spider_context, patch_size_level0_px=patch_size_level0)
    class_names = class_names_of(tiles, [name.strip() for name in classes.split(",")] if classes else None)
    parts = split_probe_tiles(tiles, class_names, seed)
    if model_repo is not None:
        model = load_repository_model(model_repo, encoder_backend, precision)  # type: ignore[arg-type]
    else:
        model = load_checkpoint_model(
            weights, weights_format, encoder_config, "fp32" if precision == "auto" else precision
        )  # type: ignore[arg-type]
    typer.echo(f"{len(tiles)} tiles of {len(class_names)} classes; encoder {model.info.name} on {model.info.encoder}")
    for group in slides_in_several_parts(tiles, parts):
        typer.echo(f"note: {group} has tiles in more than one part; its test tiles have near copies in training")
    with progress_bar("tile", "embedding", total=len(tiles)) as bar:
        embedded = embed_probe_tiles(
            tiles,
            model.encoder,
            model.spec,
            spider_context=spider_context,
            backend=reader_backend,  # type: ignore[arg-type]
            batch_size=batch_size,
            num_workers=reader_threads,
            fallback_mpp=fallback_mpp,
            on_progress=lambda done, total: advance(bar, done, total),
        )
    if line := resized_images_line(embedded, model.encoder.tile_size_px):
        typer.echo(line)
    by_part = probe_parts(embedded, tiles, class_names, parts)
    result = fit_linear_probe(
        by_part["train"],
        by_part["val"],
        by_part["test"],
        class_names,
        c_grid=c_grid,
        max_iter=max_iter,
        ordinal=ordinal,
    )
    config = {
        "source": str(source),
        "slide_dir": str(slide_dir) if slide_dir else None,
        "spider_context": spider_context,
        "patch_size_level0": patch_size_level0,
        "seed": seed,
        "reader_backend": reader_backend,
    }
    paths = write_probe_outputs(
        output_dir,
        result,
        tiles,
        embedded,
        parts,
        identity=EncoderIdentity.of_model(model.info),
        spec=model.spec,
        config=config,
    )
    typer.echo(probe_table(result, split_counts(tiles, parts, class_names)))
    typer.echo(f"wrote {', '.join(str(path) for path in paths.values())}")


def _numbers(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None
