"""`xmag extract`: feature files equal to classification's embeddings, resumable after SIGKILL, split by torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from safetensors.torch import save_file
from test_errors import damage_tiles
from typer.testing import CliRunner

from xmag.cli import app
from xmag.features import read_feature_file
from xmag.models.abmil import GatedABMIL, SlideHeads
from xmag.models.checkpoints.xmag_format import save_encoder_checkpoint
from xmag.models.encoder import build_tile_encoder
from xmag.pipeline import classify_slide
from xmag.runtimes.torch_backend import TorchSlideHeads, TorchTileEncoder
from xmag.synthetic.slide import make_synthetic_slide
from xmag.training.extract import SlideListError, merged_outcomes, read_slide_list

SLIDE_COUNT = 6


@pytest.fixture(scope="module")
def six_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("six")
    for index in range(SLIDE_COUNT):
        (folder / ("nested" if index % 2 else "")).mkdir(exist_ok=True)
        make_synthetic_slide(
            folder / ("nested" if index % 2 else "") / f"slide-{index:02d}.svs",
            width_px=8_000,
            height_px=6_000,
            base_magnification=20,
            seed=40 + index,
            n_lesions=1,
        )
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    encoder = build_tile_encoder("tiny_dinov2", seed=0)
    heads = SlideHeads({"t": GatedABMIL(in_dim=encoder.embed_dim, num_classes=2)}, {"t": ["a", "b"]})
    save_encoder_checkpoint(encoder.vit, path, heads=heads)
    return path


def _extract(source, out, checkpoint, *extra) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "xmag.cli",
        "extract",
        str(source),
        "--out",
        str(out),
        "--weights",
        str(checkpoint),
    ]
    return subprocess.Popen([*command, "--batch-size", "4", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finished(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout.decode(), stderr.decode()


def _contents(folder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found = {}
    for path in sorted(folder.glob("*.h5")):
        features = read_feature_file(path)
        found[path.stem] = (features.features, features.coords)
    return found


def test_extracted_embeddings_equal_classification(six_slides, checkpoint, tmp_path):
    result = CliRunner().invoke(
        app, ["extract", str(six_slides), "--out", str(tmp_path), "--weights", str(checkpoint), "--batch-size", "4"]
    )
    assert result.exit_code == 0, result.output
    assert f"{SLIDE_COUNT} extracted, 0 already current, 0 failed" in result.output
    assert str(six_slides) not in result.output  # paths may identify patients: ids only on the console
    encoder = TorchTileEncoder(build_tile_encoder("tiny_dinov2", seed=0))
    slide = six_slides / "nested" / "slide-01.svs"
    heads = TorchSlideHeads(SlideHeads({"t": GatedABMIL(in_dim=encoder.embed_dim, num_classes=2)}, {"t": ["a", "b"]}))
    classified = classify_slide(str(slide), encoder, heads, batch_size=4)
    extracted = read_feature_file(tmp_path / "slide-01.h5")
    assert np.abs(extracted.features - classified.embeddings).max() <= 1e-6
    np.testing.assert_array_equal(extracted.coords, classified.level0_coords)
    again = CliRunner().invoke(
        app, ["extract", str(six_slides), "--out", str(tmp_path), "--weights", str(checkpoint), "--batch-size", "4"]
    )
    assert again.exit_code == 0 and f"0 extracted, {SLIDE_COUNT} already current" in again.output


def test_sigkill_loses_at_most_the_slide_in_flight(six_slides, checkpoint, tmp_path):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    assert _finished(_extract(six_slides, whole, checkpoint))[0] == 0
    process = _extract(six_slides, interrupted, checkpoint)
    deadline = time.monotonic() + 300
    while not list(interrupted.glob("*.h5")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = list(interrupted.glob("*.h5"))
    assert 0 < len(written) < SLIDE_COUNT, f"the kill came too late or too early: {len(written)} files"
    for path in written:  # whatever stands under a final name is whole
        with h5py.File(path, "r") as h5:
            assert len(h5["features"]) == len(h5["coords"]) > 0
    code, stdout, stderr = _finished(_extract(six_slides, interrupted, checkpoint))
    assert code == 0, stderr
    assert "already current" in stdout and f"{len(written)} already current" in stdout
    assert not list(interrupted.glob(".*.partial"))
    expected, found = _contents(whole), _contents(interrupted)
    assert sorted(found) == sorted(expected) and len(found) == SLIDE_COUNT
    for slide_id, (features, coords) in expected.items():
        np.testing.assert_array_equal(found[slide_id][0], features)
        np.testing.assert_array_equal(found[slide_id][1], coords)


def test_two_torchrun_processes_split_the_list(six_slides, checkpoint, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "xmag.cli"]
    command += ["extract", str(six_slides), "--out", str(tmp_path), "--weights", str(checkpoint), "--batch-size", "4"]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    logged = [
        json.loads(line)
        for rank in (0, 1)
        for line in (tmp_path / "outcomes" / f"rank-{rank}.jsonl").read_text().splitlines()
    ]
    done = sorted(outcome["slide_id"] for outcome in logged if outcome["status"] == "done")
    assert done == [f"slide-{index:02d}" for index in range(SLIDE_COUNT)]  # each once, none missed
    by_rank = {rank: sorted(o["slide_id"] for o in logged if o["rank"] == rank) for rank in (0, 1)}
    listed = [entry.slide_id for entry in read_slide_list(six_slides)]  # nested/ sorts before slide-00
    assert by_rank == {0: sorted(listed[0::2]), 1: sorted(listed[1::2])}
    assert len(merged_outcomes(tmp_path)) == SLIDE_COUNT and len(list(tmp_path.glob("*.h5"))) == SLIDE_COUNT
    assert f"all ranks: {SLIDE_COUNT} extracted" in completed.stdout


def test_a_bad_slide_stops_the_run_or_is_skipped(six_slides, checkpoint, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "good.svs").symlink_to(six_slides / "slide-00.svs")
    damage_tiles(six_slides / "slide-00.svs", folder / "bad.svs", page_index=0, keep_bytes=0)
    stopped = CliRunner().invoke(
        app, ["extract", str(folder), "--out", str(tmp_path / "a"), "--weights", str(checkpoint)]
    )
    assert stopped.exit_code == 2 and "error:" in stopped.output
    skipped = CliRunner().invoke(
        app, ["extract", str(folder), "--out", str(tmp_path / "b"), "--weights", str(checkpoint), "--skip-errors"]
    )
    assert skipped.exit_code == 1, skipped.output
    assert "1 extracted, 0 already current, 1 failed" in skipped.output and "failed: bad" in skipped.output
    outcomes = merged_outcomes(tmp_path / "b")
    assert outcomes["bad"].status == "failed" and outcomes["bad"].code == "corrupt_slide"
    assert outcomes["good"].status == "done" and (tmp_path / "b" / "good.h5").is_file()


def test_slide_lists(six_slides, tmp_path):
    from_folder = read_slide_list(six_slides)
    assert sorted(entry.slide_id for entry in from_folder) == [f"slide-{i:02d}" for i in range(SLIDE_COUNT)]
    listed = tmp_path / "slides.txt"
    listed.write_text(f"# two slides\n{six_slides / 'slide-00.svs'}\n\n{six_slides / 'nested' / 'slide-01.svs'}\n")
    assert [entry.slide_id for entry in read_slide_list(listed)] == ["slide-00", "slide-01"]
    clam = tmp_path / "dataset.csv"
    clam.write_text("case_id,slide_id,label\ncase-1,slide-00,tumour\ncase-1,slide-01,normal\n")
    from_csv = read_slide_list(clam, slide_dir=six_slides)
    assert [entry.path for entry in from_csv] == [six_slides / "slide-00.svs", six_slides / "nested" / "slide-01.svs"]
    with pytest.raises(SlideListError, match="--slide-dir"):
        read_slide_list(clam)
    padded = tmp_path / "padded.csv"
    padded.write_text("case_id,slide_id,label\nc,007,x\n")
    with pytest.raises(SlideListError, match="'007'"):  # read as a string, not as 7
        read_slide_list(padded, slide_dir=six_slides)
    escaping = tmp_path / "escaping.csv"
    escaping.write_text(f"slide_id,slide_path\n../outside,{six_slides / 'slide-00.svs'}\n")
    with pytest.raises(SlideListError, match="cannot name a feature file"):
        read_slide_list(escaping)
    twice = tmp_path / "twice.txt"
    twice.write_text(f"{six_slides / 'slide-00.svs'}\n{six_slides / 'slide-00.svs'}\n")
    with pytest.raises(SlideListError, match="two slides have the id 'slide-00'"):
        read_slide_list(twice)


def test_a_20x_teacher_is_extracted_at_20x(six_slides, tmp_path):
    # UNI2-h's recipe at test size, saved with timm's key names as the official file has them.
    weights = tmp_path / "tiny_uni2h.safetensors"
    save_file(build_tile_encoder("tiny_uni2h", seed=0).vit.state_dict(), str(weights))
    source = tmp_path / "one.txt"
    source.write_text(str(six_slides / "slide-00.svs") + "\n")
    arguments = ["extract", str(source), "--out", str(tmp_path / "out"), "--weights", str(weights)]
    result = CliRunner().invoke(app, [*arguments, "--weights-format", "timm", "--encoder-config", "tiny_uni2h"])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "out" / "slide-00.h5", "r") as h5:
        attrs = h5["coords"].attrs
        assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["target_magnification"]) == (256, 256, 20)
        assert h5["features"].shape[1] == 192 and json.loads(h5.attrs["xmag_tiling"])["encoder_input_px"] == 224
        assert len(h5["features"]) > 100  # 16x the 5x grid's tiles
