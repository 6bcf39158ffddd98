"""`xmag train e2e`: the frozen part stays bit-identical while the trained blocks and the head move, checkpointing
saves memory, the reentrant form would train nothing, tiles are read as serving reads them, and the run's checkpoint
exports with its fine-tuning on record."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from torch.nn import functional
from torch.utils.checkpoint import checkpoint
from training_support import LESION_TASK
from typer.testing import CliRunner

from xmag.cli import app
from xmag.export.repository import export_model_repository
from xmag.features import read_feature_file
from xmag.loading import load_encoder_weights
from xmag.model_repo import load_model_repository
from xmag.models.checkpoints.xmag_format import encoder_weights_sha256, load_xmag_checkpoint
from xmag.models.encoder import TileEncoder, build_tile_encoder
from xmag.models.vit import get_vit_config
from xmag.pipeline import embed_slide
from xmag.runtimes.torch_backend import TorchTileEncoder
from xmag.synthetic.dataset import LESION_CLASSES, CohortSlide
from xmag.training.config import HeadsConfig
from xmag.training.dataset import read_dataset_csv
from xmag.training.e2e import (
    FINE_TUNED_FROM,
    E2EConfig,
    E2EModel,
    build_head,
    choose_precision,
    embed_whole_slide,
    measure_activation_memory,
    plan_slide_tiles,
    read_tiles,
)
from xmag.training.splits import Fold, write_clam_splits

XMAG_TRAIN_E2E = [sys.executable, "-m", "xmag.cli", "train", "e2e"]
# tiny_dinov2 has two blocks: the first stays frozen, the second trains.
FROZEN_BLOCKS = 1
SEED = 0


def _tiny_vit():
    return build_tile_encoder("tiny_dinov2", seed=SEED).vit


def _tiles(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, 256, (count, 224, 224, 3), dtype=torch.uint8, generator=generator)


def _small_split(cohort, features_dir: Path, directory: Path) -> tuple[Path, Path]:
    """One slide of each of 8 patients, 4 per class: train 2 + 2, validation 1 + 1, test 1 + 1 (a CSV, CLAM splits).

    Validation and test see whole bags, so they get the patients' smallest slides (tile counts from the cohort's
    feature files); training reads 4 tiles a slide whatever its size.
    """
    tiles = {
        entry.slide_id: len(read_feature_file(features_dir / f"{entry.slide_id}.h5").features)
        for entry in cohort.slides
    }
    smallest: dict[str, CohortSlide] = {}
    for entry in cohort.slides:
        if entry.case_id not in smallest or tiles[entry.slide_id] < tiles[smallest[entry.case_id].slide_id]:
            smallest[entry.case_id] = entry
    by_label = {
        name: sorted((e for e in smallest.values() if e.label == name), key=lambda e: tiles[e.slide_id])
        for name in LESION_CLASSES
    }
    part = {"val": [], "test": [], "train": []}
    for entries in by_label.values():
        part["val"].append(entries[0].slide_id)
        part["test"].append(entries[1].slide_id)
        part["train"] += [entry.slide_id for entry in entries[2:4]]
    used = {slide_id for slide_ids in part.values() for slide_id in slide_ids}
    chosen = [smallest[case] for case in sorted(smallest) if smallest[case].slide_id in used]
    dataset_csv = directory / "dataset.csv"
    with dataset_csv.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["case_id", "slide_id", LESION_TASK])
        out.writerows((entry.case_id, entry.slide_id, entry.label) for entry in chosen)
    dataset = read_dataset_csv(dataset_csv, class_order={LESION_TASK: list(LESION_CLASSES)})
    write_clam_splits(directory / "splits", [Fold(**part)], dataset, LESION_TASK)
    return dataset_csv, directory / "splits"


@pytest.fixture(scope="module")
def e2e_run(lesion_cohort, tmp_path_factory):
    """`xmag train e2e` in a subprocess on 8 slides: 2 epochs, 4 tiles per bag in training, memory measured."""
    cohort, encoder_checkpoint, features_dir = lesion_cohort
    directory = tmp_path_factory.mktemp("e2e")
    dataset_csv, splits_dir = _small_split(cohort, features_dir, directory)
    run_dir = directory / "run"
    started = time.perf_counter()
    result = subprocess.run(
        [
            *XMAG_TRAIN_E2E,
            str(dataset_csv),
            "--slide-dir",
            str(cohort.slides_dir),
            "--encoder",
            str(encoder_checkpoint),
            "--out",
            str(run_dir),
            "--splits",
            str(splits_dir),
            "--classes",
            ",".join(LESION_CLASSES),
            "--frozen-blocks",
            str(FROZEN_BLOCKS),
            "--max-epochs",
            "2",
            "--max-tiles-per-bag",
            "4",
            "--bags-per-batch",
            "2",
            "--bootstrap",
            "50",
            "--seed",
            str(SEED),
            "--measure-memory",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"\nxmag train e2e (8 slides, 2 epochs) took {time.perf_counter() - started:.1f} s:\n{result.stdout}")
    assert result.returncode == 0, result.stderr
    return encoder_checkpoint, run_dir, result.stdout


def test_the_frozen_part_is_bit_identical_and_the_trained_blocks_and_head_moved(e2e_run):
    encoder_checkpoint, run_dir, _ = e2e_run
    before = load_xmag_checkpoint(encoder_checkpoint).vit.state_dict()
    tuned = load_xmag_checkpoint(run_dir / "model.safetensors")
    after = tuned.vit.state_dict()
    assert before.keys() == after.keys()
    trained_prefixes = tuple(f"blocks.{i}." for i in range(FROZEN_BLOCKS, get_vit_config("tiny_dinov2").depth))
    trained_prefixes += ("norm.",)
    frozen = [key for key in before if not key.startswith(trained_prefixes)]
    trained = [key for key in before if key.startswith(trained_prefixes)]
    assert {"patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight"} <= set(frozen)
    for key in frozen:
        assert torch.equal(before[key], after[key]), f"frozen tensor {key} changed"
    moved = [key for key in trained if not torch.equal(before[key], after[key])]
    print(f"trained encoder tensors that moved: {len(moved)} of {len(trained)}")
    assert moved == trained

    assert tuned.heads is not None
    initial = build_head(HeadsConfig(seed=SEED), tuned.vit.embed_dim, len(LESION_CLASSES)).state_dict()
    head_after = tuned.heads.heads[LESION_TASK].state_dict()
    assert [key for key in initial if torch.equal(initial[key], head_after[key])] == []


def test_the_run_directory_and_its_checkpoint_export_with_the_fine_tuning_on_record(e2e_run, tmp_path):
    encoder_checkpoint, run_dir, stdout = e2e_run
    for name in ("config.json", "metrics.json", "metrics.md", f"predictions_{LESION_TASK}.csv", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / f"roc_{LESION_TASK}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "splits" / "splits_0.csv").is_file()
    with (run_dir / f"predictions_{LESION_TASK}.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2  # the two test slides, whole bags
    config = json.loads((run_dir / "config.json").read_text())
    assert config["e2e"]["frozen_blocks"] == FROZEN_BLOCKS and config["precision"] in ("bf16", "fp32")
    print(f"precision: {config['precision']} ({config['precision_reason']})")
    assert "with gradient checkpointing" in stdout

    source = load_encoder_weights(encoder_checkpoint)
    tuned = load_xmag_checkpoint(run_dir / "model.safetensors")
    assert tuned.metadata["heads_encoder_sha256"] == encoder_weights_sha256(tuned.vit) != source.sha256
    assert tuned.metadata[FINE_TUNED_FROM] == f"{source.name} (encoder_weights_sha256 {source.sha256})"

    started = time.perf_counter()
    manifest = export_model_repository(run_dir / "model.safetensors", tmp_path / "repo")
    print(f"export took {time.perf_counter() - started:.1f} s")
    for provenance in (manifest.provenance, load_model_repository(tmp_path / "repo").manifest.provenance):
        assert provenance.fine_tuned_from == tuned.metadata[FINE_TUNED_FROM]
        assert provenance.kind == source.provenance_kind and "fine-tuned end to end" in provenance.description
    assert manifest.encoder.weights_sha256 == encoder_weights_sha256(tuned.vit)


def test_checkpointing_saves_less_activation_memory_for_backward():
    model = E2EModel(_tiny_vit(), build_head(HeadsConfig(seed=SEED), 192, 2), FROZEN_BLOCKS)
    memory = measure_activation_memory(model, _tiles(8), label=1)
    print(memory.describe())
    print(f"ratio without / with: {memory.saved_bytes_plain / memory.saved_bytes_checkpointed:.1f}x")
    # With checkpointing the trained block keeps its input, (8, 257, 192) float32, and the head's few tensors.
    assert memory.saved_bytes_checkpointed >= 8 * 257 * 192 * 4
    assert memory.saved_bytes_checkpointed * 3 < memory.saved_bytes_plain
    assert all(parameter.grad is None for parameter in model.parameters())  # a measurement, not a training step


def test_reentrant_checkpointing_would_give_a_block_above_frozen_ones_no_gradient():
    model = E2EModel(_tiny_vit(), build_head(HeadsConfig(seed=SEED, dropout=0.0), 192, 2), FROZEN_BLOCKS)
    vit, trained_block = model.vit, model.vit.blocks[FROZEN_BLOCKS]
    tiles = _tiles(2)
    model.train()  # the frozen part stays in eval mode whatever the model is told
    assert not any(module.training for module in (vit.patch_embed, *vit.blocks[:FROZEN_BLOCKS]))
    assert trained_block.training and vit.norm.training and model.head.training
    assert not any(parameter.requires_grad for parameter in model.frozen_parameters())

    def loss_with(use_reentrant: bool) -> torch.Tensor:
        with torch.no_grad():  # the frozen part, as E2EModel runs it
            x = vit.blocks[0](vit.prepare_tokens(model.encoder.normalise(tiles)))
        x = checkpoint(trained_block, x, use_reentrant=use_reentrant)
        logits, _ = model.head(vit.norm(x)[:, 0])
        return functional.cross_entropy(logits[None], torch.tensor([1]))

    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        loss_with(use_reentrant=True).backward()
    assert all(parameter.grad is None for parameter in trained_block.parameters())
    assert model.head.classifier.weight.grad is not None  # the head above it still learns
    model.zero_grad(set_to_none=True)

    loss_with(use_reentrant=False).backward()
    assert all(parameter.grad is not None for parameter in trained_block.parameters())
    assert trained_block.attn.qkv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)

    # E2EModel's own training forward takes the non-reentrant path: its trained block gets a gradient.
    logits, _ = model(tiles)
    functional.cross_entropy(logits[None], torch.tensor([1])).backward()
    assert trained_block.attn.qkv.weight.grad is not None and trained_block.attn.qkv.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in vit.blocks[0].parameters())


def test_a_bf16_step_trains_the_blocks_and_the_precision_choice_says_why():
    precision, reason = choose_precision("auto", torch.device("cpu"))
    print(f"auto precision on this CPU: {precision} ({reason})")
    model = E2EModel(_tiny_vit(), build_head(HeadsConfig(seed=SEED), 192, 2), FROZEN_BLOCKS, precision="bf16")
    logits, _ = model(_tiles(2))
    assert logits.dtype == torch.float32  # the head runs in fp32 on the encoder's upcast class tokens
    functional.cross_entropy(logits[None], torch.tensor([0])).backward()
    gradient = model.vit.blocks[FROZEN_BLOCKS].mlp.fc1.weight.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_whole_bags_are_the_tiles_serving_reads_and_encodes(lesion_cohort):
    cohort, encoder_checkpoint, _ = lesion_cohort
    source = load_encoder_weights(encoder_checkpoint)
    slide = plan_slide_tiles(cohort.slides[0].slide_id, cohort.slides[0].slide.path, source.spec)
    model = E2EModel(source.vit, build_head(HeadsConfig(), 192, 2), FROZEN_BLOCKS)
    ours = embed_whole_slide(model, slide, batch_size=16)
    serving = embed_slide(
        str(slide.path), TorchTileEncoder(TileEncoder(load_encoder_weights(encoder_checkpoint).vit)), spec=source.spec
    )
    assert model.training  # the mode is restored after evaluation
    np.testing.assert_array_equal(slide.grid.level0_coords, serving.level0_coords)
    np.testing.assert_allclose(ours, serving.embeddings, rtol=0, atol=1e-5)
    # A training bag is a subset of the same tiles, read the same way.
    first_tiles = next(read_tiles(slide, np.array([0, 2]), batch_size=2))
    assert first_tiles.shape == (2, 224, 224, 3) and first_tiles.dtype == np.uint8


def test_the_command_line_defaults_are_the_recipes():
    command = typer.main.get_command(app).commands["train"].commands["e2e"]  # type: ignore[attr-defined]
    defaults = {parameter.name: parameter.default for parameter in command.params}
    config = E2EConfig()
    assert defaults["frozen_blocks"] == config.frozen_blocks == 10
    assert defaults["max_tiles_per_bag"] == config.heads.max_tiles_per_bag
    assert defaults["encoder_learning_rate"] == config.encoder_learning_rate
    assert defaults["eval_batch_size"] == config.eval_batch_size
    assert defaults["gradient_checkpointing"] is config.gradient_checkpointing


def test_more_frozen_blocks_than_the_encoder_has_exits_2_with_a_message(lesion_cohort, tmp_path):
    # In-process (the subprocess run above covers the entry point): the root command's error mapping, as users see it.
    cohort, encoder_checkpoint, _ = lesion_cohort
    depth = get_vit_config("tiny_dinov2").depth
    arguments = [str(cohort.dataset_csv), "--slide-dir", str(cohort.slides_dir), "--encoder", str(encoder_checkpoint)]
    result = CliRunner().invoke(
        app, ["train", "e2e", *arguments, "--out", str(tmp_path / "run"), "--frozen-blocks", str(depth)]
    )
    print(result.output)
    assert result.exit_code == 2
    assert f"--frozen-blocks {depth}" in result.output and f"has {depth} transformer blocks" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "run").exists()
