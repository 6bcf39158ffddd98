"""Slide commands: write a synthetic slide, print what a slide states, plan its tile grid."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from xmag.cli.app import advance, app, progress_bar


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
    from xmag.synthetic.slide import make_synthetic_slide

    with progress_bar("tile", "writing") as bar:
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
            progress=lambda done, total: advance(bar, done, total),
        )
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

    with open_slide(slide_path, backend=backend) as reader:
        facts = reader.info
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
    from xmag.heatmap import render_tile_grid
    from xmag.slide.reader import open_slide, resolve_mpp
    from xmag.slide.tiling import TilingSpec, plan_tile_grid
    from xmag.slide.tissue import tissue_mask_for_slide

    spec = TilingSpec(target_mpp=target_mpp, tile_size_px=tile_size_px, min_tissue_fraction=min_tissue_fraction)
    with open_slide(slide_path, backend=backend) as reader:
        slide_mpp = resolve_mpp(reader.info, fallback_mpp, str(slide_path))
        tissue, thumbnail = tissue_mask_for_slide(reader, slide_mpp)
        grid = plan_tile_grid(reader.info, slide_mpp, tissue, spec)
    typer.echo(
        f"{len(grid)} tiles of {tile_size_px} px at {target_mpp} µm/px ({grid.tile_size_level0_px} level-0 px, "
        f"read from level {grid.read_level} at {grid.read_size_px} px); tissue {tissue.tissue_area_mm2:.2f} mm²"
    )
    if preview is not None:
        image = render_tile_grid(
            thumbnail, tissue.mask, tissue.level0_px_per_mask_px, grid.level0_coords, grid.tile_size_level0_px
        )
        preview.parent.mkdir(parents=True, exist_ok=True)
        image.save(preview)
        typer.echo(f"preview: {preview}")
