"""`xmag extract`: tile embeddings of many slides as feature files (TRIDENT's HDF5 layout), resumable."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from xmag.cli.app import app, progress_bar


@app.command()
def extract(
    source: Path = typer.Argument(..., help="A folder of slides (recursive), a CLAM-style CSV, or a list file."),
    output_dir: Path = typer.Option(..., "--out", help="Where to write <slide_id>.h5 and outcomes/rank-<r>.jsonl."),
    model_repo: Path | None = typer.Option(None, help="Verified model repository whose encoder to run."),
    weights: Path | None = typer.Option(
        None, help="Or a checkpoint, run in torch (e.g. UNI2-h with --encoder-config)."
    ),
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
    slide_dir: Path | None = typer.Option(None, help="Where a CSV's slide_id column finds its slides."),
    reader_backend: str = typer.Option("openslide", help="Slide reader: openslide or cucim."),
    batch_size: int = typer.Option(32, help="Tiles per encoder batch."),
    reader_threads: int = typer.Option(2, help="Decoding threads per slide."),
    fallback_mpp: float | None = typer.Option(None, "--mpp", help="Scan resolution to use if a slide states none."),
    skip_errors: bool = typer.Option(False, help="Go on past a slide that fails (its outcome says why)."),
) -> None:
    """One feature file per slide; a rerun skips slides already extracted with this encoder and tiling.

    Under torchrun each process takes its share of the slides (torchrun
    --nproc-per-node N -m xmag.cli extract ...). Exit status 1 when a slide
    failed with --skip-errors, 2 when the run stopped at an error.
    """
    from xmag.features import EncoderIdentity
    from xmag.loading import load_checkpoint_model, load_repository_model
    from xmag.training.extract import (
        Ranks,
        extract_features,
        merged_outcomes,
        read_slide_list,
        share_of,
        summary_line,
        wait_for_every_rank,
    )

    if (model_repo is None) == (weights is None):
        raise ValueError("give the encoder as exactly one of --model-repo or --weights")
    ranks = Ranks.from_environment()
    if ranks.world_size > 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
    entries = share_of(read_slide_list(source, slide_dir), ranks.rank, ranks.world_size)
    if model_repo is not None:
        model = load_repository_model(model_repo, encoder_backend, precision)  # type: ignore[arg-type]
    else:
        model = load_checkpoint_model(
            weights, weights_format, encoder_config, "fp32" if precision == "auto" else precision
        )  # type: ignore[arg-type]
    info = model.info
    identity = EncoderIdentity.of_model(info)
    typer.echo(f"rank {ranks.rank} of {ranks.world_size}: {len(entries)} slides, encoder {info.name} on {info.encoder}")
    started = time.perf_counter()
    with progress_bar("slide", "extracting", total=len(entries)) as bar:
        tiles = 0

        def advanced(outcome) -> None:
            nonlocal tiles
            tiles += outcome.tiles
            bar.set_postfix_str(
                f"{outcome.slide_id} {outcome.status}, {tiles / (time.perf_counter() - started):.1f} tiles/s"
            )
            bar.update(1)

        outcomes = extract_features(
            entries,
            output_dir,
            model.encoder,
            identity,
            model.spec,
            backend=reader_backend,  # type: ignore[arg-type]
            batch_size=batch_size,
            num_workers=reader_threads,
            fallback_mpp=fallback_mpp,
            skip_errors=skip_errors,
            rank=ranks.rank,
            on_outcome=advanced,
        )
    wait_for_every_rank(ranks)
    mine = {outcome.slide_id: outcome for outcome in outcomes}
    typer.echo(f"rank {ranks.rank}: " + summary_line(mine, time.perf_counter() - started))
    if ranks.rank == 0 and ranks.world_size > 1:
        typer.echo("all ranks: " + summary_line(merged_outcomes(output_dir), time.perf_counter() - started))
    if any(outcome.status == "failed" for outcome in outcomes):
        raise typer.Exit(code=1)
