"""`xmag bench --quick`: the harness runs end to end on tiny models (it checks the harness, not the speed)."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from xmag.benchmarks.harness import scale_to_full_grid
from xmag.benchmarks.report import PAPER, comparisons


def test_quick_benchmark_writes_every_output(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "xmag.cli",
            "bench",
            "--quick",
            "--out",
            str(tmp_path / "out"),
            "--slides-dir",
            str(tmp_path / "slides"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((tmp_path / "out/results.json").read_text())
    assert report["quick"] and report["hardware"]["cpu_cores"] >= 1
    rows = {(r["config"], r["scan_magnification"]): r for r in report["results"]}
    assert set(rows) == {("xmag", 20), ("xmag", 40), ("naive_xmag", 20), ("uni2h", 20), ("phikon", 20)}
    for result in rows.values():
        assert result["slides_per_minute"] > 0 and result["tiles_per_slide"] > 0
        assert set(result["stage_seconds_per_slide"]) == {"open", "tissue", "read", "encode", "heads"}
    # The 20x grids are about 16 times the 5x grid of the same glass (256 px tiles: about 12 times).
    assert 10 < rows[("uni2h", 20)]["tiles_per_slide"] / rows[("xmag", 20)]["tiles_per_slide"] < 14
    assert rows[("uni2h", 20)]["extrapolated"] and not rows[("xmag", 20)]["extrapolated"]
    assert rows[("uni2h", 20)]["slides"][0]["tiles_encoded"] == 8
    assert {"xmag_over_uni2h", "ours_over_naive"} <= set(report["comparisons"])
    markdown = (tmp_path / "out/results.md").read_text()
    assert "QUICK" in markdown and "XMAG over UNI2-h" in markdown and "*" in markdown
    for plot in ("slides_per_minute.png", "stage_breakdown.png"):
        assert Image.open(tmp_path / "out" / plot).size[0] > 500


def test_extrapolation_scales_read_and_encode_only():
    scaled = scale_to_full_grid(
        "s",
        {
            "tile_count": 100,
            "tiles_encoded": 10,
            "timings_s": {"open": 1.0, "tissue": 2.0, "read": 0.5, "encode": 3.0, "heads": 0.1},
        },
    )
    assert scaled["extrapolated"] and scaled["stages_s"]["encode"] == 30.0 and scaled["stages_s"]["read"] == 5.0
    assert scaled["seconds"] == 1.0 + 2.0 + 5.0 + 30.0 + 0.1


def test_the_paper_ratio_is_its_29_5():
    ratios = comparisons(
        [
            {"config": "xmag", "slides_per_minute": 6.0},
            {"config": "uni2h", "slides_per_minute": 0.5},
            {"config": "naive_xmag", "slides_per_minute": 2.0},
        ]
    )
    assert round(ratios["paper_xmag_over_uni2h"], 1) == 29.5 and ratios["xmag_over_uni2h"] == 12.0
    assert ratios["ours_over_naive"] == 3.0 and round(PAPER["xmag"], 2) == 8.80
