"""`xmag train pairs`: distillation pairs (20x teacher region, 5x student tile) as shards; see training/pairs.py."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from xmag.cli.app import progress_bar
from xmag.cli.train import train_app


@train_app.command("pairs")
def pairs(
    source: Path = typer.Argument(..., help="A folder of slides (recursive), a CLAM-style CSV, or a list file."),
    output_dir: Path = typer.Option(..., "--out", help="Where to write shards/, records/, manifest.json, outcomes/."),
    slide_dir: Path | None = typer.Option(None, help="Where a CSV's slide_id column finds its slides."),
    max_regions_per_slide: int | None = typer.Option(
        None, help="A seeded random subset of at most this many regions per slide (default: every 5x tissue tile)."
    ),
    seed: int = typer.Option(0, help="Seed of the per-slide subset."),
    shard_size: int = typer.Option(1000, help="Most pairs per shard; a slide's last shard holds the rest."),
    min_tissue: float = typer.Option(0.5, help="Least tissue fraction of a region (serving's 5x grid: 0.5)."),
    reader_backend: str = typer.Option("openslide", help="Slide reader: openslide or cucim."),
    reader_threads: int = typer.Option(2, help="Decoding threads per slide."),
    fallback_mpp: float | None = typer.Option(None, "--mpp", help="Scan resolution to use if a slide states none."),
    skip_errors: bool = typer.Option(False, help="Go on past a slide that fails (its outcome says why)."),
) -> None:
    """Cut each slide's 5x tissue tiles into pairs: the 896 px region at 0.5 µm/px and the 224 px tile at 2.0 µm/px.

    A rerun skips slides already written with the same sampling and goes on.
    Under torchrun each process takes its share of the slides; rank 0 writes
    manifest.json when all are done. Exit status 1 when a slide failed with
    --skip-errors, 2 when the run stopped at an error (no manifest then: rerun).
    """
    from xmag.training.extract import Ranks, read_slide_list, share_of, wait_for_every_rank
    from xmag.training.pairs import MANIFEST_FILE, PairsConfig, summary_line, write_manifest, write_pairs

    config = PairsConfig(
        max_regions_per_slide=max_regions_per_slide, seed=seed, shard_size=shard_size, min_tissue_fraction=min_tissue
    )
    ranks = Ranks.from_environment()
    entries = read_slide_list(source, slide_dir)
    mine = share_of(entries, ranks.rank, ranks.world_size)
    typer.echo(f"rank {ranks.rank} of {ranks.world_size}: {len(mine)} slides")
    started = time.perf_counter()
    with progress_bar("slide", "pairs", total=len(mine)) as bar:
        regions = 0

        def advanced(outcome) -> None:
            nonlocal regions
            regions += outcome.tiles
            bar.set_postfix_str(f"{outcome.slide_id} {outcome.status}, {regions} pairs")
            bar.update(1)

        outcomes = write_pairs(
            mine,
            output_dir,
            config,
            backend=reader_backend,  # type: ignore[arg-type]
            num_workers=reader_threads,
            fallback_mpp=fallback_mpp,
            skip_errors=skip_errors,
            rank=ranks.rank,
            on_outcome=advanced,
        )
    wait_for_every_rank(ranks)
    typer.echo(f"rank {ranks.rank}: " + summary_line(outcomes, time.perf_counter() - started))
    if ranks.rank == 0:
        manifest = write_manifest(output_dir, entries, config)
        typer.echo(
            f"wrote {output_dir / MANIFEST_FILE}: {len(manifest['slides'])} slides, {manifest['samples']} pairs "
            f"in {len(manifest['shards'])} shards"
        )
    if any(outcome.status == "failed" for outcome in outcomes):
        raise typer.Exit(code=1)
