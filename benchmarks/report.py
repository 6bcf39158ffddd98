"""Benchmark output: results.json, a markdown table (results.md) and two PNG plots."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

# The paper's benchmark (seconds per slide, A100), as slides per minute: 8.80, 1.11, 0.30.
PAPER_SECONDS_PER_SLIDE = {"xmag": 6.82, "phikon": 54.21, "uni2h": 201.25}
PAPER = {name: 60.0 / seconds for name, seconds in PAPER_SECONDS_PER_SLIDE.items()}


def comparisons(results: list[dict]) -> dict:
    """The ratios the issue asks for: XMAG over UNI2-h (the paper: 29.5x), ours over the naive pipeline."""
    by_name = {result["config"]: result for result in results if result.get("scan_magnification", 20) == 20}
    ratios = {}
    if "xmag" in by_name and "uni2h" in by_name:
        ratios["xmag_over_uni2h"] = by_name["xmag"]["slides_per_minute"] / by_name["uni2h"]["slides_per_minute"]
        ratios["paper_xmag_over_uni2h"] = PAPER["xmag"] / PAPER["uni2h"]
    if "xmag" in by_name and "naive_xmag" in by_name:
        ratios["ours_over_naive"] = by_name["xmag"]["slides_per_minute"] / by_name["naive_xmag"]["slides_per_minute"]
    if "xmag" in by_name:
        ratios["xmag_over_paper_xmag"] = by_name["xmag"]["slides_per_minute"] / PAPER["xmag"]
    return ratios


def markdown_table(report: dict) -> str:
    hardware = report["hardware"]
    lines = [
        f"# Benchmark: {'QUICK (tiny models, small slides: checks the harness, not speed)' if report['quick'] else 'slides per minute'}",
        "",
        f"Hardware: {hardware['cpu']}, {hardware['cpu_cores']} cores, {hardware['memory_gib']} GiB; "
        f"GPU: {hardware['gpu'] or 'none'}; torch {hardware['torch']}. Written {report['written_at']}.",
        (
            "Tiny stand-in models, so the figures say nothing about speed. "
            if report["quick"]
            else "Random weights at the true architectures (speed does not depend on the weights). "
        )
        + "Figures marked * are extrapolated from the first tiles of each slide.",
        "",
        "| configuration | encoder | tiles/slide | slides/min | tiles/s | s/slide | open | tissue | read wait | encode | heads | peak host GiB | paper slides/min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        star = "*" if result["extrapolated"] else ""
        stages = result["stage_seconds_per_slide"]
        paper = result["paper_slides_per_minute"]
        lines.append(
            f"| {result['label']} | {result['encoder']}, batch {result['batch_size']} | {result['tiles_per_slide']:.0f} "
            f"| {result['slides_per_minute']:.3g}{star} | {result['tiles_per_second']:.3g}{star} "
            f"| {result['seconds_per_slide']:.3g}{star} | {stages['open']:.2f} | {stages['tissue']:.2f} "
            f"| {stages['read']:.2f}{star} | {stages['encode']:.3g}{star} | {stages['heads']:.3f} "
            f"| {result['peak_host_memory_gib']:.1f} | {f'{paper:.2f}' if paper is not None else '—'} |"
        )
    ratios = report["comparisons"]
    lines.append("")
    if "xmag_over_uni2h" in ratios:
        lines.append(
            f"XMAG over UNI2-h: **{ratios['xmag_over_uni2h']:.1f}×** slides per minute "
            f"(the paper: {ratios['paper_xmag_over_uni2h']:.1f}×)."
        )
    if "ours_over_naive" in ratios:
        lines.append(f"Our pipeline over the naive one, XMAG: **{ratios['ours_over_naive']:.1f}×**.")
    if "xmag_over_paper_xmag" in ratios:
        lines.append(
            f"XMAG here against the paper's {PAPER['xmag']:.1f} slides/min: {ratios['xmag_over_paper_xmag']:.2f}×."
        )
    return "\n".join(lines) + "\n"


def write_plots(report: dict, output_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = ["\n".join(textwrap.wrap(result["label"], 22)) for result in results]
    hardware = report["hardware"]
    where = f"{hardware['gpu'] or hardware['cpu']} ({hardware['cpu_cores']} CPU cores)"

    figure, axes = plt.subplots(figsize=(11, 5.5))
    values = [result["slides_per_minute"] for result in results]
    bars = axes.bar(range(len(results)), values, color=["#bc3754" if r["extrapolated"] else "#2b6cb0" for r in results])
    for bar, result in zip(bars, results, strict=False):
        text = f"{result['slides_per_minute']:.3g}{'*' if result['extrapolated'] else ''}"
        axes.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9)
        paper = result["paper_slides_per_minute"]
        if paper is not None:
            axes.hlines(
                paper, bar.get_x() - 0.05, bar.get_x() + bar.get_width() + 0.05, colors="black", linestyles="--"
            )
            axes.annotate(f"paper {paper:.2f}", (bar.get_x() + bar.get_width(), paper), fontsize=8, va="bottom")
    axes.set_yscale("log")
    axes.set_xticks(range(len(results)), labels, fontsize=8)
    axes.set_ylabel("slides per minute (log scale)")
    axes.set_title(
        f"Whole pipeline, slides per minute — {where}\n(* extrapolated from a tile subset; dashed: the paper's A100 figures)",
        fontsize=10,
    )
    figure.tight_layout()
    throughput = output_dir / "slides_per_minute.png"
    figure.savefig(throughput, dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(11, 5.5))
    stages = ["open", "tissue", "read", "encode", "heads"]
    totals = [sum(result["stage_seconds_per_slide"][stage] for stage in stages) for result in results]
    bottoms = [0.0] * len(results)
    for stage in stages:
        shares = [
            100 * result["stage_seconds_per_slide"][stage] / total
            for result, total in zip(results, totals, strict=False)
        ]
        axes.bar(range(len(results)), shares, bottom=bottoms, label=stage)
        bottoms = [b + h for b, h in zip(bottoms, shares, strict=False)]
    for index, (total, result) in enumerate(zip(totals, results, strict=False)):
        axes.annotate(
            f"{total:.3g} s/slide{'*' if result['extrapolated'] else ''}", (index, 101), ha="center", fontsize=8
        )
    axes.set_ylim(0, 110)
    axes.set_xticks(range(len(results)), labels, fontsize=8)
    axes.set_ylabel("share of the time per slide (%)")
    axes.set_title(
        f"Where a slide's time goes — {where}\n(read = time the encoder waited for tiles; * extrapolated)", fontsize=10
    )
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    breakdown = output_dir / "stage_breakdown.png"
    figure.savefig(breakdown, dpi=120)
    plt.close(figure)
    return [throughput, breakdown]


def write_report(report: dict, output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "results.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    markdown_path = output_dir / "results.md"
    markdown_path.write_text(markdown_table(report))
    return [json_path, markdown_path, *write_plots(report, output_dir)]
