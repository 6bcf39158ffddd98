"""`xmag train distill`: a tiny student learns a tiny teacher from real pairs of synthetic slides, resumes exactly,
validates the EMA model with its own heads, releases an XMAG checkpoint the export takes, and runs under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from xmag.export.repository import export_model_repository
from xmag.models.checkpoints.xmag_format import load_xmag_checkpoint
from xmag.synthetic.slide import make_synthetic_slide
from xmag.training.distill import LOG_FILE, Augmentation, DistillConfig, train_distillation
from xmag.training.extract import read_slide_list
from xmag.training.pairs import PairsConfig, PairShards, teacher_crops, write_manifest, write_pairs

TRAIN_SLIDES = {"alpha": 41, "beta": 42, "gamma": 43}
VAL_SLIDES = {"delta": 44}
# Tiny models; an EMA decay of 0.7 (not the recipe's 0.999) so that the EMA follows a run of six steps.
TINY = DistillConfig(
    teacher_config="tiny_uni2h",
    student_config="tiny_dinov2",
    epochs=3,
    batch_size=6,
    lr=1e-3,
    min_lr=1e-5,
    warmup_steps=1,
    ema_decay=0.7,
    checkpoint_every=4,
    keep_last=2,
)


def _pairs(folder, slides: dict[str, int], *configs: PairsConfig):
    for slide_id, seed in slides.items():
        make_synthetic_slide(
            folder / f"{slide_id}.svs", width_px=4_000, height_px=3_000, base_magnification=20, seed=seed
        )
    listing = folder / "slides.txt"
    listing.write_text("".join(f"{slide_id}.svs\n" for slide_id in slides))
    entries = read_slide_list(listing)
    for number, config in enumerate(configs):
        write_pairs(entries, folder / f"pairs-{number}", config)
        write_manifest(folder / f"pairs-{number}", entries, config)
    return [folder / f"pairs-{number}" for number in range(len(configs))]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Real pairs: of three training slides, of a held-out slide, and of two regions of it (for quick checks)."""
    (train,) = _pairs(tmp_path_factory.mktemp("distill_train"), TRAIN_SLIDES, PairsConfig(shard_size=8))
    val, small_val = _pairs(
        tmp_path_factory.mktemp("distill_val"), VAL_SLIDES, PairsConfig(), PairsConfig(max_regions_per_slide=2)
    )
    return train, val, small_val


def _log(out_dir, kind: str) -> list[dict]:
    entries = [json.loads(line) for line in (out_dir / LOG_FILE).read_text().splitlines()]
    return [entry for entry in entries if entry["kind"] == kind]


def test_the_ema_student_learns_the_teacher_and_is_released(pairs, tmp_path):
    train_dir, val_dir, _ = pairs
    print(f"\n{len(PairShards(train_dir))} training pairs, {len(PairShards(val_dir))} held out")
    result = train_distillation(train_dir, val_dir, tmp_path / "run", TINY)
    first, last = result.validations[0], result.validations[-1]
    print(
        f"held-out cosine of the EMA student with its EMA heads over {result.steps} steps: "
        f"global {first['global_cosine']:.3f} -> {last['global_cosine']:.3f}, "
        f"local {first['local_cosine']:.3f} -> {last['local_cosine']:.3f}"
    )
    assert result.steps == result.total_steps
    assert last["global_cosine"] - first["global_cosine"] >= 0.3
    assert last["local_cosine"] > first["local_cosine"]
    steps = _log(tmp_path / "run", "train")
    assert [entry["step"] for entry in steps] == list(range(1, result.total_steps + 1))
    assert {"epoch", "loss", "global", "local", "lr", "regions_per_s"} <= set(steps[0])
    assert steps[-1]["lr"] == pytest.approx(TINY.min_lr)
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*.pt"))) == TINY.keep_last

    checkpoint = load_xmag_checkpoint(result.release)
    assert checkpoint.metadata["provenance_kind"] == "trained"
    assert checkpoint.metadata["distill_steps"] == str(result.steps)
    assert len(checkpoint.metadata["teacher_encoder_sha256"]) == len(checkpoint.metadata["pairs_manifest_sha256"]) == 64
    assert json.loads(checkpoint.metadata["distill_config"])["student_config"] == "tiny_dinov2"
    # The released weights are the EMA's, not the online student's.
    state = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    ema_state = {key[len("student.vit.") :]: value for key, value in state["ema"]["module"].items()}
    for key, value in checkpoint.vit.state_dict().items():
        torch.testing.assert_close(value, ema_state[key], rtol=0, atol=0)
    manifest = export_model_repository(result.release, tmp_path / "repository")
    assert manifest.artifacts


def test_a_resumed_run_repeats_the_uninterrupted_losses_exactly(pairs, tmp_path):
    train_dir, _, val_dir = pairs
    # Regions of 2 make 6 steps an epoch: the run is interrupted in mid-epoch, after a checkpoint at step 2.
    config = replace(TINY, epochs=1, batch_size=2, checkpoint_every=2)
    whole = train_distillation(train_dir, val_dir, tmp_path / "whole", config)
    interrupted = train_distillation(train_dir, val_dir, tmp_path / "parts", replace(config, max_steps=3))
    assert interrupted.steps == 3 and interrupted.release is None
    with pytest.raises(ValueError, match="resume"):
        train_distillation(train_dir, val_dir, tmp_path / "parts", config)
    with pytest.raises(ValueError, match="not held out"):
        train_distillation(train_dir, train_dir, tmp_path / "leaky", config)
    with pytest.raises(ValueError, match="other settings"):
        train_distillation(train_dir, val_dir, tmp_path / "parts", replace(config, lr=2e-3), resume=True)
    resumed = train_distillation(train_dir, val_dir, tmp_path / "parts", config, resume=True)
    assert resumed.steps == whole.steps == 6
    losses = [
        (entry["step"], entry["loss"], entry["global"], entry["local"]) for entry in _log(tmp_path / "whole", "train")
    ]
    again = [
        (entry["step"], entry["loss"], entry["global"], entry["local"]) for entry in _log(tmp_path / "parts", "train")
    ]
    print(f"\nlosses of steps 4..6, uninterrupted: {losses[3:]}\n             resumed after step 3: {again[3:]}")
    assert again == losses  # exactly, on CPU, the steps after the interruption included
    assert resumed.validations[-1] == whole.validations[-1]
    np.testing.assert_array_equal(
        load_xmag_checkpoint(resumed.release).vit.state_dict()["cls_token"],
        load_xmag_checkpoint(whole.release).vit.state_dict()["cls_token"],
    )


def test_both_views_get_the_same_augmentation(pairs):
    pair = PairShards(pairs[0])[0]
    teacher, student = torch.from_numpy(pair.teacher), torch.from_numpy(pair.student)
    drawn = [Augmentation.draw(0, 0, index) for index in range(64)]
    assert drawn == [Augmentation.draw(0, 0, index) for index in range(64)]  # a pure function of (seed, epoch, index)
    assert {(a.horizontal_flip, a.vertical_flip, a.jitter is None) for a in drawn} == {
        (h, v, j) for h in (False, True) for v in (False, True) for j in (False, True)
    }
    for augmentation in drawn[:8]:
        views = augmentation(teacher).numpy(), augmentation(student).numpy()
        downsampled = views[0].reshape(224, 4, 224, 4, 3).astype(np.float64).mean(axis=(1, 3))
        assert np.abs(downsampled - views[1]).mean() < 8  # still the same tissue in the same place
        # Crop i of the augmented region lies over cell i (56 px) of the augmented student tile.
        crops = teacher_crops(views[0])
        for cell in (0, 5, 15):
            row, col = divmod(cell, 4)
            crop = crops[cell].reshape(56, 4, 56, 4, 3).astype(np.float64).mean(axis=(1, 3))
            assert np.abs(crop - views[1][row * 56 : (row + 1) * 56, col * 56 : (col + 1) * 56]).mean() < 8


def test_the_command_trains_and_refuses_bad_input(pairs, tmp_path):
    train_dir, _, val_dir = pairs
    base = [sys.executable, "-m", "xmag.cli", "train", "distill", "--pairs", str(train_dir), "--val-pairs"]
    common = [str(val_dir), "--out", str(tmp_path / "run"), "--teacher-config", "tiny_uni2h"]
    small = ["--student-config", "tiny_dinov2", "--epochs", "1", "--batch-size", "2", "--ema-decay", "0.7"]
    done = subprocess.run([*base, *common, *small, "--max-steps", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "held-out global cosine" in done.stdout and "stopped after step 2 of 6" in done.stdout
    assert [entry["step"] for entry in _log(tmp_path / "run", "train")] == [1, 2]
    bad = subprocess.run([*base, *common, *small, "--batch-size", "1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "batch_size" in bad.stderr


def test_two_processes_under_torchrun_train_one_model(pairs, tmp_path):
    train_dir, _, val_dir = pairs
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    arguments = ["-m", "xmag.cli", "train", "distill", "--pairs", str(train_dir), "--val-pairs", str(val_dir)]
    options = ["--out", str(tmp_path / "run"), "--teacher-config", "tiny_uni2h", "--student-config", "tiny_dinov2"]
    small = ["--epochs", "1", "--batch-size", "2", "--ema-decay", "0.7"]
    done = subprocess.run([*command, *arguments, *options, *small], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # 12 pairs at a global batch of 2 x 2 regions: 3 steps, logged once (by rank 0), with every rank's regions.
    steps = _log(tmp_path / "run", "train")
    assert [(entry["step"], entry["total_steps"]) for entry in steps] == [(1, 3), (2, 3), (3, 3)]
    assert len(_log(tmp_path / "run", "validation")) == 2
    assert load_xmag_checkpoint(tmp_path / "run" / "student.safetensors").metadata["distill_steps"] == "3"


def test_two_processes_with_half_the_batch_compute_one_process_loss(pairs, tmp_path):
    # The heads' batch norm sees every process's rows (global_batch_norm): the first step's loss, computed before any
    # update, is the loss of one process with the whole batch. Without it, each process normalises its own half
    # and the first step's loss differs in the third decimal (-0.0435 against -0.0471 here).
    train_dir, _, val_dir = pairs
    arguments = ["-m", "xmag.cli", "train", "distill", "--pairs", str(train_dir), "--val-pairs", str(val_dir)]
    models = ["--teacher-config", "tiny_uni2h", "--student-config", "tiny_dinov2", "--epochs", "1"]
    common = [*arguments, *models, "--ema-decay", "0.7", "--lr", "1e-3", "--warmup-steps", "1"]
    single = [sys.executable, *common, "--out", str(tmp_path / "one"), "--batch-size", "4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    double = [*torchrun, *common, "--out", str(tmp_path / "two"), "--batch-size", "2"]
    for command in (single, double):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = _log(tmp_path / "one", "train")[0], _log(tmp_path / "two", "train")[0]
    print(f"first step, 1 process x 4 regions: {one['loss']:.8f}; 2 processes x 2: {two['loss']:.8f}")
    for term in ("loss", "global", "local"):
        assert two[term] == pytest.approx(one[term], abs=1e-5), term
