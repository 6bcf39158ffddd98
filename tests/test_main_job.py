"""The main job (`make demo` = `xmag demo`) from an empty working directory, then the in-process classifier on its repository."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from xmag.cli import app
from xmag.model_repo import load_model_repository


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
    assert "$ xmag serve --port" in out and "curl -s -X POST http://127.0.0.1:" in out
    answer = json.loads((workdir / "out/demo_slide.result.json").read_text())
    assert answer["model"]["kind"] == "untrained-demo" and "UNTRAINED DEMO WEIGHTS" in answer["model"]["notice"]
    assert '"kind": "untrained-demo"' in out and '"demo_lesion"' in out
    assert answer["slide"]["tile_count"] == len(answer["attention"]["level0_coords"]) > 0
    assert set(answer["predictions"]["demo_lesion"]["probabilities"]) == {"normal", "lesion"}
    heatmap = Image.open(workdir / "out/demo_slide.demo_lesion.heatmap.png")
    assert heatmap.format == "PNG" and heatmap.size[0] > 100
    geojson = json.loads((workdir / "out/demo_slide.demo_lesion.attention.geojson").read_text())
    assert len(geojson["features"]) == answer["slide"]["tile_count"]
    assert load_model_repository(workdir / "model_repo/demo").manifest.provenance.kind == "untrained-demo"


def test_classify_in_process_with_the_demo_repository(demo_run, monkeypatch):
    workdir, completed = demo_run
    assert completed.returncode == 0, "the main job failed; see the test above"
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(
        app, ["classify", "out/demo/demo_slide.svs", "--model-repo", "model_repo/demo", "--out", "offline"]
    )
    assert result.exit_code == 0, result.output
    assert "UNTRAINED DEMO WEIGHTS" in result.output and "demo_lesion:" in result.output
    offline = json.loads((workdir / "offline/demo_slide.result.json").read_text())
    served = json.loads((workdir / "out/demo_slide.result.json").read_text())
    assert offline["slide"]["tile_count"] == served["slide"]["tile_count"]
    assert offline["predictions"]["demo_lesion"]["label"] == served["predictions"]["demo_lesion"]["label"]
