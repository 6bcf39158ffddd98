"""A classified slide as files: one ClassifyResult JSON, and per task a heatmap PNG and a GeoJSON.

`xmag classify` writes them; the files are named `<stem>.result.json`,
`<stem>.<task>.heatmap.png` and `<stem>.<task>.attention.geojson`, as `xmag
demo` names what it fetches from the service, and the result's `heatmaps`
point at the files written beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from xmag.heatmap import attention_geojson, render_attention_heatmap
from xmag.pipeline import SlideResult
from xmag.result_schema import ClassifyResult, HeatmapLinks


def write_result_files(document: ClassifyResult, result: SlideResult, output_dir: Path, stem: str) -> list[Path]:
    """Write the heatmaps, the GeoJSON and the result JSON (written last, whole); returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    links = {}
    for task, prediction in result.predictions.items():
        png_path = output_dir / f"{stem}.{task}.heatmap.png"
        render_attention_heatmap(
            result.thumbnail,
            result.tissue.level0_px_per_mask_px,
            result.level0_coords,
            result.tile_size_level0_px,
            prediction.attention,
        ).save(png_path)
        geojson_path = output_dir / f"{stem}.{task}.attention.geojson"
        geojson = attention_geojson(result.level0_coords, result.tile_size_level0_px, prediction.attention, task)
        geojson_path.write_text(json.dumps(geojson))
        written += [png_path, geojson_path]
        links[task] = HeatmapLinks(png_url=png_path.resolve().as_uri(), geojson_url=geojson_path.resolve().as_uri())
    result_path = output_dir / f"{stem}.result.json"
    write_result_json(document.model_copy(update={"heatmaps": links}), result_path)
    written.append(result_path)
    return written


def write_result_json(document: ClassifyResult, path: Path) -> Path:
    """One result as JSON, written to a temporary name and renamed, so no reader sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(document.model_dump_json(indent=1) + "\n")
    partial.replace(path)
    return path
