"""`xmag train heads`: learning proven on held-out patients, a shuffled-label control, the run's files, the chain
to a served model, and the refusals (mismatched encoders, leaking splits)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from service_support import running_service, service_settings
from training_support import LESION_TASK, shuffled_dataset_csv, train_lesion_heads

from xmag.errors import CheckpointError
from xmag.export.repository import export_model_repository
from xmag.features import read_feature_file
from xmag.models.checkpoints.xmag_format import (
    HEADS_ENCODER_SHA256,
    encoder_weights_sha256,
    load_xmag_checkpoint,
    save_encoder_checkpoint,
)
from xmag.models.encoder import TileEncoder, build_tile_encoder
from xmag.pipeline import embed_slide
from xmag.runtimes.torch_backend import TorchTileEncoder
from xmag.service.rest import create_app
from xmag.synthetic.dataset import tile_lesion_fractions
from xmag.training.config import HeadsConfig
from xmag.training.cross_validation import HeadsRun, train_heads
from xmag.training.dataset import read_dataset_csv
from xmag.training.splits import read_clam_splits

XMAG_TRAIN_HEADS = [sys.executable, "-m", "xmag.cli", "train", "heads"]


def _pooled_auc(summary: dict) -> float:
    return summary["tasks"][LESION_TASK]["pooled"]["metrics"]["auc"]


def test_heads_find_lesions_on_held_out_patients_and_shuffled_labels_do_not(lesion_run, lesion_cohort, tmp_path):
    cohort, encoder_checkpoint, features_dir = lesion_cohort
    control_csv = shuffled_dataset_csv(cohort, tmp_path / "shuffled.csv")
    control = train_lesion_heads(tmp_path, cohort, encoder_checkpoint, features_dir, control_csv)
    trained_auc, control_auc = _pooled_auc(lesion_run.summary), _pooled_auc(control.summary)
    folds = [fold["metrics"]["auc"] for fold in lesion_run.summary["tasks"][LESION_TASK]["folds"]]
    print(f"held-out AUC (3 folds by patient, pooled): {trained_auc:.3f}; per fold {folds}")
    print(f"label-shuffled control, same folds and recipe: {control_auc:.3f}")
    assert trained_auc >= 0.95
    assert abs(control_auc - 0.5) <= 0.3


def test_the_run_directory_holds_what_a_user_needs(lesion_run):
    run_dir, summary = lesion_run.run_dir, lesion_run.summary
    for name in ("config.json", "metrics.json", "metrics.md", f"predictions_{LESION_TASK}.csv", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / f"roc_{LESION_TASK}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for index in range(3):
        for suffix in ("", "_bool", "_descriptor"):
            assert (run_dir / "splits" / f"splits_{index}{suffix}.csv").is_file()

    # Every slide is predicted once, held out, by the fold whose test part it is in.
    with (run_dir / f"predictions_{LESION_TASK}.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["slide_id"] for row in rows) == sorted(entry.slide_id for entry in lesion_run.cohort.slides)
    assert set(rows[0]) == {"fold", "slide_id", "case_id", "label", "predicted", "p_normal", "p_lesion"}

    task = summary["tasks"][LESION_TASK]
    pooled = task["pooled"]
    for name, value in pooled["metrics"].items():
        low, high = pooled["ci95"][name]
        assert low <= value <= high, name  # the bootstrap CI contains the point estimate
    assert set(task["mean"]) == set(task["sd"]) == set(pooled["metrics"])
    assert "| pooled |" in (run_dir / "metrics.md").read_text()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["heads"]["max_tiles_per_bag"] == 512 and len(config["dataset_sha256"]) == 64

    checkpoint = load_xmag_checkpoint(run_dir / "model.safetensors")
    assert checkpoint.heads is not None and checkpoint.heads.class_names == {LESION_TASK: ["normal", "lesion"]}
    assert checkpoint.metadata[HEADS_ENCODER_SHA256] == encoder_weights_sha256(checkpoint.vit)
    assert (
        read_feature_file(next(lesion_run.features_dir.glob("*.h5"))).encoder_sha256
        == (checkpoint.metadata[HEADS_ENCODER_SHA256])
    )


def test_written_splits_are_patient_disjoint_and_read_back(lesion_run):
    dataset = read_dataset_csv(lesion_run.cohort.dataset_csv)
    case_of = {slide.slide_id: slide.case_id for slide in dataset.slides}
    folds = read_clam_splits(lesion_run.run_dir / "splits", dataset)  # raises if a patient is in two parts
    assert len(folds) == 3
    assert sorted(slide for fold in folds for slide in fold.test) == sorted(case_of)  # each slide tested once
    for fold in folds:
        parts = [{case_of[slide] for slide in fold.part(name)} for name in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_a_leaking_split_is_refused(lesion_run, tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    slides = [entry.slide_id for entry in lesion_run.cohort.slides]  # p000_s0, p000_s1, ...: pairs of one patient
    with (splits / "splits_0.csv").open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["", "train", "val", "test"])
        out.writerows(
            [0, train, val, test] for train, val, test in zip(slides[1::3], slides[2::3], slides[0::3], strict=False)
        )
    with pytest.raises(ValueError, match="leaks patients"):
        read_clam_splits(splits, read_dataset_csv(lesion_run.cohort.dataset_csv))


def test_served_probabilities_equal_the_torch_heads_on_the_same_features(lesion_model, lesion_run, tmp_path):
    settings = service_settings(
        model_repo=lesion_model.repository,
        slide_roots=[lesion_model.slides_dir],
        embedding_cache_dir=tmp_path / "cache",
    )
    slide = lesion_model.lesion_slide
    with running_service(create_app(settings)) as base_url:
        response = httpx.post(f"{base_url}/v1/classify", json={"slide_path": str(slide.path)}, timeout=300)
    assert response.status_code == 200, response.text
    served = response.json()["predictions"][LESION_TASK]["probabilities"]
    # The features the service encoded, as its embedding cache kept them; the heads in torch, from the run's checkpoint.
    (cached,) = (tmp_path / "cache").rglob("*.h5")
    features = torch.from_numpy(read_feature_file(cached).features)
    heads = load_xmag_checkpoint(lesion_run.checkpoint).heads
    assert heads is not None
    with torch.no_grad():
        logits, _ = heads(features)[LESION_TASK]
    expected = dict(zip(heads.class_names[LESION_TASK], torch.softmax(logits, 0).tolist(), strict=True))
    print(f"served {served}, torch heads {expected}")
    for name, probability in expected.items():
        assert served[name] == pytest.approx(probability, abs=1e-5)


def test_the_trained_head_attends_to_the_lesions_of_held_out_slides(lesion_model, lesion_run):
    checkpoint = load_xmag_checkpoint(lesion_run.checkpoint)
    assert checkpoint.heads is not None
    slide = lesion_model.lesion_slide
    embedded = embed_slide(str(slide.path), TorchTileEncoder(TileEncoder(checkpoint.vit)))
    with torch.no_grad():
        logits, attention = checkpoint.heads(torch.from_numpy(embedded.embeddings))[LESION_TASK]
    on_lesion = tile_lesion_fractions(slide, embedded.level0_coords, embedded.tile_size_level0_px) > 0
    mass = float(attention.numpy()[on_lesion].sum())
    print(f"held-out 20x slide: {on_lesion.sum()} of {len(on_lesion)} tiles touch a lesion; attention mass {mass:.3f}")
    assert int(logits.argmax()) == 1  # "lesion"
    assert mass >= 0.8


def test_export_refuses_heads_trained_on_another_encoders_features(lesion_run, tmp_path):
    trained = load_xmag_checkpoint(lesion_run.checkpoint)
    other = build_tile_encoder("tiny_dinov2", seed=1).vit
    swapped = tmp_path / "swapped.safetensors"
    save_encoder_checkpoint(
        other, swapped, heads=trained.heads, heads_encoder_sha256=trained.metadata[HEADS_ENCODER_SHA256]
    )
    with pytest.raises(CheckpointError) as refused:
        export_model_repository(swapped, tmp_path / "repo")
    message = str(refused.value)
    assert trained.metadata[HEADS_ENCODER_SHA256] in message and encoder_weights_sha256(other) in message
    assert not (tmp_path / "repo").exists()


def test_heads_refuse_features_of_another_encoder(lesion_cohort, tmp_path):
    cohort, _, features_dir = lesion_cohort
    other = tmp_path / "other.safetensors"
    save_encoder_checkpoint(build_tile_encoder("tiny_dinov2", seed=1).vit, other)
    result = subprocess.run(
        [
            *XMAG_TRAIN_HEADS,
            str(cohort.dataset_csv),
            *("--features", str(features_dir), "--encoder", str(other)),
            *("--out", str(tmp_path / "run"), "--folds", "3"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "were made by the encoder with weights sha256" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_command_trains_from_clam_files_and_our_splits(lesion_run, tmp_path):
    # CLAM's layout: h5_files/<slide_id>.h5 with only features and int32 coords (no attributes).
    import h5py

    clam = tmp_path / "clam" / "h5_files"
    clam.mkdir(parents=True)
    for path in lesion_run.features_dir.glob("*.h5"):
        ours = read_feature_file(path)
        with h5py.File(clam / path.name, "w") as out:
            out["features"] = ours.features
            out["coords"] = ours.coords.astype(np.int32)
    result = subprocess.run(
        [
            *XMAG_TRAIN_HEADS,
            str(lesion_run.cohort.dataset_csv),
            *("--features", str(tmp_path / "clam"), "--encoder", str(lesion_run.encoder_checkpoint)),
            *("--out", str(tmp_path / "run"), "--splits", str(lesion_run.run_dir / "splits")),
            *("--classes", f"{LESION_TASK}=normal,lesion", "--max-epochs", "3", "--bootstrap", "50"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "do not record which encoder made them" in result.stdout
    assert "| pooled | 20 |" in result.stdout
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["folds"] == 3 and written["tasks"][LESION_TASK]["class_names"] == ["normal", "lesion"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["case_id", "label"], ["p1", "a"]], "needs the columns case_id, slide_id"),
        ([["case_id", "slide_id", "label"], ["p1", "s1", "a"], ["p2", "s1", "b"]], "listed twice"),
        ([["case_id", "slide_id", "label"], ["p1", "s1", "a"], ["p2", "s2", "a"]], "at least two classes"),
    ],
)
def test_a_bad_dataset_csv_gets_a_clear_error(tmp_path, rows, message):
    path = tmp_path / "dataset.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with pytest.raises(ValueError, match=message):
        read_dataset_csv(path)


def test_import_weights_carries_the_heads_encoder_and_refuses_another(lesion_run, tmp_path):
    from xmag.export.import_weights import import_weights

    trained = load_xmag_checkpoint(lesion_run.checkpoint)
    recorded = trained.metadata[HEADS_ENCODER_SHA256]
    kept = tmp_path / "kept.safetensors"
    import_weights(
        lesion_run.encoder_checkpoint,
        kept,
        architecture="tiny_dinov2",
        heads=trained.heads,
        heads_encoder_sha256=recorded,
    )
    assert load_xmag_checkpoint(kept).metadata[HEADS_ENCODER_SHA256] == recorded
    other = tmp_path / "other.safetensors"
    save_encoder_checkpoint(build_tile_encoder("tiny_dinov2", seed=1).vit, other)
    with pytest.raises(CheckpointError, match=recorded):
        import_weights(
            other,
            tmp_path / "refused.safetensors",
            architecture="tiny_dinov2",
            heads=trained.heads,
            heads_encoder_sha256=recorded,
        )
    assert not (tmp_path / "refused.safetensors").exists()


def test_the_encoder_may_be_a_model_repository(lesion_model, lesion_run, tmp_path):
    # The repository was exported from the run's checkpoint: the same encoder weights made the features.
    summary = train_heads(
        HeadsRun(
            dataset_csv=lesion_run.cohort.dataset_csv,
            features_dir=lesion_run.features_dir,
            encoder=lesion_model.repository,
            output_dir=tmp_path / "run",
            config=HeadsConfig(max_epochs=2),
            folds=3,
            bootstrap_resamples=20,
        )
    )
    assert summary["encoder"]["weights_sha256"] == lesion_run.summary["encoder"]["weights_sha256"]
    assert load_xmag_checkpoint(tmp_path / "run" / "model.safetensors").heads is not None


def test_each_label_column_is_a_task_with_its_own_head(lesion_run, tmp_path):
    # A second task on the same features, with one slide unlabelled for it: that slide is left out of that task only.
    with lesion_run.cohort.dataset_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    dataset_csv = tmp_path / "two_tasks.csv"
    with dataset_csv.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["case_id", "slide_id", LESION_TASK, "site"])
        for index, row in enumerate(rows):
            site = "" if index == 0 else ("north" if row["slide_id"].endswith("_s0") else "south")
            out.writerow([row["case_id"], row["slide_id"], row[LESION_TASK], site])
    summary = train_heads(
        HeadsRun(
            dataset_csv=dataset_csv,
            features_dir=lesion_run.features_dir,
            encoder=lesion_run.encoder_checkpoint,
            output_dir=tmp_path / "run",
            config=HeadsConfig(max_epochs=2),
            folds=3,
            class_order={LESION_TASK: ["normal", "lesion"]},
            bootstrap_resamples=20,
        )
    )
    assert set(summary["tasks"]) == {LESION_TASK, "site"}
    assert summary["tasks"]["site"]["pooled"]["slides"] == len(rows) - 1
    heads = load_xmag_checkpoint(tmp_path / "run" / "model.safetensors").heads
    assert heads is not None and heads.class_names == {LESION_TASK: ["normal", "lesion"], "site": ["north", "south"]}
    for task in (LESION_TASK, "site"):
        assert (tmp_path / "run" / f"predictions_{task}.csv").is_file()
        assert (tmp_path / "run" / f"roc_{task}.png").is_file()
