"""The main job (`make demo` = `xmag demo`) from an empty working directory: synthetic cohort -> features -> a trained
head -> export -> serve -> classify, the answer pointing at the lesion; then the in-process classifier on its repository."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from xmag.cli import app
from xmag.model_repo import load_model_repository
from xmag.synthetic.dataset import tile_lesion_fractions
from xmag.synthetic.slide import load_synthetic_slide


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("main_job")
    completed = subprocess.run(
        [sys.executable, "-m", "xmag.cli", "demo", "--out", "out"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=workdir,  # the demo repository is built under the working directory
    )
    return workdir, completed


def test_the_main_job_serves_and_classifies_the_demo_slide(demo_run):
    workdir, completed = demo_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    for step in ("$ xmag extract ", "$ xmag train heads ", "$ xmag export ", "$ xmag serve --model-repo", "curl -s"):
        assert step in out, step
    print(next(line for line in out.splitlines() if "held-out AUC" in line))
    answer = json.loads((workdir / "out/demo_slide.result.json").read_text())
    assert answer["model"]["kind"] == "untrained-demo"
    assert "encoder is untrained" in answer["model"]["notice"] and "synthetic slides" in answer["model"]["notice"]
    assert answer["slide"]["tile_count"] == len(answer["attention"]["level0_coords"]) > 0
    # The trained head finds the demo slide's lesion (a slide it never saw) and its attention is on it.
    assert answer["predictions"]["lesion"]["label"] == "lesion"
    slide = load_synthetic_slide(workdir / "out/demo/demo_slide.json")
    coords = np.asarray(answer["attention"]["level0_coords"])
    on_lesion = tile_lesion_fractions(slide, coords, answer["attention"]["tile_size_level0_px"]) > 0
    mass = float(np.asarray(answer["attention"]["weights"]["lesion"])[on_lesion].sum())
    print(f"demo slide: {on_lesion.sum()} of {len(coords)} tiles touch the lesion and hold {mass:.3f} of the attention")
    assert mass >= 0.8
    heatmap = Image.open(workdir / "out/demo_slide.lesion.heatmap.png")
    assert heatmap.format == "PNG" and heatmap.size[0] > 100
    geojson = json.loads((workdir / "out/demo_slide.lesion.attention.geojson").read_text())
    assert len(geojson["features"]) == answer["slide"]["tile_count"]
    manifest = load_model_repository(workdir / "model_repo/demo").manifest
    assert manifest.provenance.kind == "untrained-demo" and "synthetic slides" in manifest.provenance.description
    assert (workdir / "out/demo/heads/metrics.md").is_file()


def test_classify_in_process_with_the_demo_repository(demo_run, monkeypatch):
    workdir, completed = demo_run
    assert completed.returncode == 0, "the main job failed; see the test above"
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(
        app, ["classify", "out/demo/demo_slide.svs", "--model-repo", "model_repo/demo", "--out", "offline"]
    )
    assert result.exit_code == 0, result.output
    assert "DEMO MODEL" in result.output and "lesion:" in result.output
    offline = json.loads((workdir / "offline/demo_slide.result.json").read_text())
    served = json.loads((workdir / "out/demo_slide.result.json").read_text())
    assert offline["slide"]["tile_count"] == served["slide"]["tile_count"]
    assert offline["predictions"]["lesion"]["label"] == served["predictions"]["lesion"]["label"] == "lesion"
