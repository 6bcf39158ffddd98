"""The benchmark harness: whole-pipeline slides per minute for XMAG, UNI2-h, Phikon and a naive reference.

Each configuration runs in its own child process (`python -m xmag.benchmarks.harness
CONFIG ...`), so its peak memory is its own and one configuration's threads and
caches do not warm up the next. A configuration runs every slide through the
pipeline the service runs (`xmag.pipeline.classify_slide`: open, tissue, tile,
read on background threads while the encoder works, encode, heads), one slide
after another, after one untimed warm-up batch.

With `max_tiles` a slide's grid is planned in full but only its first tiles
are read and encoded; reading and encoding are then scaled to the full grid.
Such figures are extrapolations and are labelled so everywhere they appear.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from xmag.benchmarks.report import PAPER
from xmag.errors import XmagError
from xmag.slide.tiling import PHIKON_20X, UNI2H_20X, XMAG_5X, TilingSpec

Pipeline = Literal["ours", "naive"]


@dataclass(frozen=True)
class BenchConfig:
    name: str
    label: str
    architecture: str  # a name of xmag.models.vit.VIT_CONFIGS
    quick_architecture: str  # the small stand-in used by --quick
    spec: TilingSpec
    pipeline: Pipeline
    paper_slides_per_minute: float | None  # the paper's figure for this model, where it gives one


CONFIGS = {
    config.name: config
    for config in (
        BenchConfig("xmag", "XMAG ViT-B/14, 5x, 224 px", "xmag_vitb14", "tiny_dinov2", XMAG_5X, "ours", PAPER["xmag"]),
        BenchConfig(
            "uni2h", "UNI2-h ViT-H/14 reg8, 20x, 256 px → 224", "uni2h", "tiny_uni2h", UNI2H_20X, "ours", PAPER["uni2h"]
        ),
        BenchConfig(
            "phikon",
            "Phikon ViT-B/16, 20x, 256 px → 224",
            "phikon_vitb16",
            "tiny_dinov2",
            PHIKON_20X,
            "ours",
            PAPER["phikon"],
        ),
        BenchConfig(
            "naive_xmag",
            "XMAG, naive: read_region per tile, torch fp32, no overlap",
            "xmag_vitb14",
            "tiny_dinov2",
            XMAG_5X,
            "naive",
            None,
        ),
    )
}


def hardware_description() -> dict:
    """CPU model and cores, GPU and library versions, for every result file."""
    import torch

    cpu_model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# -- one configuration, in the child process --------------------------------


def _encoder_for(config: BenchConfig, architecture: str, quick: bool, device: str, model_repo: str | None):
    """The fastest correct encoder this harness can build for the configuration, and what it is."""
    import torch

    from xmag.models.encoder import build_tile_encoder
    from xmag.runtimes.torch_backend import TorchTileEncoder

    if config.pipeline == "naive":
        return TorchTileEncoder(build_tile_encoder(architecture, seed=0), "fp32", "cpu" if device == "cpu" else device)
    if config.name == "xmag" and not quick:
        # The product path: the exported repository, backend chosen by measuring (as `xmag serve` does).
        from xmag.model_repo import load_model_repository
        from xmag.runtimes.selection import select_encoder_runtime

        if model_repo is None:
            raise BenchmarkError("the xmag configuration measures an exported model repository; none was given")
        repository = load_model_repository(model_repo)
        probe = 64 if torch.cuda.is_available() else 4
        return select_encoder_runtime(repository, probe_batch_size=probe).runtime
    # The 20x models are not exported (UNI2-h's ONNX would be 2.7 GB); torch at its fastest correct precision.
    precision = "fp16" if device == "cuda" else "bf16"
    return TorchTileEncoder(build_tile_encoder(architecture, seed=0), precision, device)


def run_config(
    config: BenchConfig,
    slide_paths: list[str],
    batch_size: int,
    reader_threads: int,
    max_tiles: int | None,
    quick: bool,
    backend: str,
    model_repo: str | None = None,
) -> dict:
    """Measure one configuration on every slide; returns the JSON-ready result."""
    import torch

    from xmag.models.abmil import GatedABMIL, SlideHeads
    from xmag.runtimes.torch_backend import TorchSlideHeads

    device = "cuda" if torch.cuda.is_available() else "cpu"
    architecture = config.quick_architecture if quick else config.architecture
    started = time.perf_counter()
    encoder = _encoder_for(config, architecture, quick, device, model_repo)
    load_s = time.perf_counter() - started
    torch.manual_seed(0)
    heads = TorchSlideHeads(
        SlideHeads({"bench": GatedABMIL(in_dim=encoder.embed_dim, num_classes=2)}, {"bench": ["a", "b"]})
    )
    warm = np.zeros((min(batch_size, 8), encoder.tile_size_px, encoder.tile_size_px, 3), np.uint8)
    encoder.encode(warm)  # first-call costs (kernel choice, allocation) are not throughput

    slides = []
    for path in slide_paths:
        if config.pipeline == "naive":
            from xmag.benchmarks.naive import naive_classify

            measured = naive_classify(path, encoder, heads, config.spec, batch_size, max_tiles)
        else:
            from xmag.pipeline import classify_slide

            result = classify_slide(
                path,
                encoder,
                heads,
                spec=config.spec,
                backend=backend,
                batch_size=batch_size,
                num_workers=reader_threads,
                max_tiles_encoded=max_tiles,
            )
            measured = {
                "tile_count": result.facts.tile_count,
                "tiles_encoded": result.facts.tiles_encoded,
                "timings_s": result.timings_s,
            }
        slides.append(scale_to_full_grid(Path(path).name, measured))

    seconds = [slide["seconds"] for slide in slides]
    tiles = [slide["tile_count"] for slide in slides]
    stage_means = {stage: float(np.mean([s["stages_s"][stage] for s in slides])) for stage in slides[0]["stages_s"]}
    extrapolated = any(slide["extrapolated"] for slide in slides)
    return {
        "config": config.name,
        "label": config.label,
        "architecture": architecture,
        "pipeline": config.pipeline,
        "encoder": encoder.description,
        "target_mpp": config.spec.target_mpp,
        "tile_size_px": config.spec.tile_size_px,
        "encoder_input_px": config.spec.output_px,
        "batch_size": batch_size,
        "reader_threads": reader_threads if config.pipeline == "ours" else 1,
        "reader_backend": backend if config.pipeline == "ours" else "openslide read_region",
        "model_load_s": load_s,
        "slides": slides,
        "tiles_per_slide": float(np.mean(tiles)),
        "seconds_per_slide": float(np.mean(seconds)),
        "slides_per_minute": 60.0 / float(np.mean(seconds)),
        "tiles_per_second": float(np.sum(tiles) / np.sum(seconds)),
        "stage_seconds_per_slide": stage_means,
        "extrapolated": extrapolated,
        "max_tiles": max_tiles,
        "peak_host_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "paper_slides_per_minute": config.paper_slides_per_minute,
    }


def scale_to_full_grid(name: str, measured: dict) -> dict:
    """A slide's stage times, with read and encode scaled to the full grid when only a subset was encoded."""
    stages = dict(measured["timings_s"])
    tile_count, encoded = measured["tile_count"], measured["tiles_encoded"]
    factor = tile_count / encoded if encoded else 1.0
    for stage in ("read", "encode"):
        stages[stage] *= factor
    return {
        "slide": name,
        "tile_count": tile_count,
        "tiles_encoded": encoded,
        "extrapolated": encoded < tile_count,
        "stages_s": stages,
        "seconds": float(sum(stages.values())),
    }


# -- the parent: every configuration, then the report -----------------------


@dataclass(frozen=True)
class BenchRun:
    """One row of the table: a configuration on the slides of one scan magnification."""

    config: str
    slide_paths: tuple[str, ...]
    scan_magnification: int
    max_tiles: int | None


def require_plotting() -> None:
    """ModuleNotFoundError now, rather than after minutes of measuring, if matplotlib (the [bench] extra) is absent."""
    import matplotlib  # noqa: F401 - imported for the check; report.py plots with it


def tile_limits(gpu: bool, quick: bool, overrides: list[str]) -> dict[str, int | None]:
    """Tiles encoded per slide for each configuration (None: every tile); `overrides` are NAME=N or NAME=all.

    The 20x models encode a subset on a CPU, and the result is extrapolated to the whole slide.
    """
    limits: dict[str, int | None] = (
        {"uni2h": 2048, "naive_xmag": 512} if gpu else {"uni2h": 24, "phikon": 96, "naive_xmag": 96}
    )
    if quick:
        limits = {"uni2h": 8, "phikon": 8, "naive_xmag": 8}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in CONFIGS or not (value == "all" or (value.isdigit() and int(value) > 0)):
            raise ValueError(f"--max-tiles takes NAME=N or NAME=all with NAME in {sorted(CONFIGS)}, got {item!r}")
        limits[name] = None if value == "all" else int(value)
    return limits


def plan_runs(names: list[str], glasses: list, scan_40x: bool, limits: dict[str, int | None]) -> list[BenchRun]:
    """One run per configuration on the 20x glasses, and XMAG once more on the 40x scans of the same glasses."""
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; choose from {sorted(CONFIGS)}")
    at = {
        magnification: tuple(str(g.path) for g in glasses if g.base_magnification == magnification)
        for magnification in (20, 40)
    }
    runs = [BenchRun(name, at[20], 20, limits.get(name)) for name in names]
    if scan_40x and "xmag" in names:
        runs.insert(names.index("xmag") + 1, BenchRun("xmag", at[40], 40, limits.get("xmag")))
    return runs


def run_benchmark(
    runs: list[BenchRun],
    output_dir: Path,
    *,
    batch_size: int,
    reader_threads: int,
    quick: bool,
    backend: str,
    model_repo: Path | None = None,
    say=print,
) -> dict:
    """Run each configuration in a child process and write results.json, results.md and the plots.

    `model_repo` is the exported repository the xmag configuration measures (the product path).
    """
    require_plotting()
    results = []
    for run in runs:
        config = CONFIGS[run.config]
        say(
            f"running {config.label} on {len(run.slide_paths)} {run.scan_magnification}x slide(s)"
            + (f", first {run.max_tiles} tiles per slide, extrapolated" if run.max_tiles else "")
        )
        arguments = {
            "config": run.config,
            "slides": list(run.slide_paths),
            "batch_size": batch_size,
            "reader_threads": reader_threads,
            "max_tiles": run.max_tiles,
            "quick": quick,
            "backend": backend,
            "model_repo": None if model_repo is None else str(model_repo),
        }
        completed = subprocess.run(
            [sys.executable, "-m", "xmag.benchmarks.harness", json.dumps(arguments)], capture_output=True, text=True
        )
        if completed.returncode != 0:
            raise BenchmarkError(f"configuration {run.config} failed:\n{completed.stderr[-4000:]}")
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        result["scan_magnification"] = run.scan_magnification
        if run.scan_magnification != 20:
            result["label"] += f" ({run.scan_magnification}x scans)"
        say(
            f"  {result['slides_per_minute']:.3g} slides/min, {result['tiles_per_second']:.3g} tiles/s, "
            f"{result['tiles_per_slide']:.0f} tiles/slide{' (extrapolated)' if result['extrapolated'] else ''}"
        )
        results.append(result)

    from xmag.benchmarks.report import comparisons, write_report

    report = {
        "hardware": hardware_description(),
        "quick": quick,
        "results": results,
        "comparisons": comparisons(results),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    report["files"] = [str(path) for path in write_report(report, output_dir)]
    return report


class BenchmarkError(XmagError):
    """A configuration's child process failed, or the benchmark was asked for something it cannot run."""

    code = "benchmark_failed"


def _child_main(arguments: dict) -> None:
    config = CONFIGS[arguments["config"]]
    result = run_config(
        config,
        arguments["slides"],
        arguments["batch_size"],
        arguments["reader_threads"],
        arguments["max_tiles"],
        arguments["quick"],
        arguments["backend"],
        arguments["model_repo"],
    )
    print(json.dumps(result))


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
