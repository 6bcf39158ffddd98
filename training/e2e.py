"""e2e-XMAG: the encoder's last blocks fine-tuned jointly with a gated-ABMIL head, from slides: the recipe.

    load the encoder (weights, name, sha256, tiling) and split it at block N (frozen_blocks, 10 by default):
        frozen:  patch embedding, position embedding, class and register tokens, blocks 0..N-1, in eval mode and
                 run under no_grad: they store nothing for backward and never change
        trained: blocks N.. (each under non-reentrant gradient checkpointing), the final norm, and the head, whose
                 first layer is the projection from the encoder's width to the head's
    plan every slide's tile grid once, as serving does (µm/px, tissue mask, plan_tile_grid at the encoder's tiling)
    one fold: patient-grouped (patient_folds, fold i of k) or CLAM's splits_<i>.csv; every fold's files are written
    for each epoch (at most max_epochs):
        shuffle the training slides; a new seeded generator every epoch
        for each batch of bags_per_batch slides:
            for each slide: read max_tiles_per_bag random tissue tiles through the tiler, encode them, run the head,
                backward on its share of the batch's class-weighted cross-entropy (gradients accumulate, so one
                bag's activations are in memory at a time whatever the batch)
            AdamW step (the encoder's blocks at encoder_learning_rate, the head at the heads' rate), cosine per step
        validation: every tile of every validation slide, encoded in batches in eval mode under no_grad, the head
        keep the weights of the best validation loss; stop after `patience` epochs without one
    the fold's test slides on whole bags: metrics, predictions, ROC curve (training/reports.py)
    the checkpoint: the fine-tuned encoder and the head, with heads_encoder_sha256 of the fine-tuned encoder,
        the source encoder's provenance kind, and `fine_tuned_from` naming the source encoder and its sha256

The tile cap bounds training memory and time and varies the tiles seen; it is
not part of the model: validation and test see whole bags, as serving does.
The encoder runs under bf16 autocast where the hardware computes bf16
natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else in fp32;
the head always runs in fp32, as in serving. Deterministic on the CPU for a
seed (the global RNG is forked and seeded, every epoch draws from its own
generator); on a GPU, cuDNN and atomics may not be.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from xmag import __version__
from xmag.loading import EncoderWeights, load_encoder_weights
from xmag.model_repo import sha256_of
from xmag.models.abmil import GatedABMIL, SlideHeads
from xmag.models.checkpoints.xmag_format import encoder_weights_sha256, save_encoder_checkpoint
from xmag.models.encoder import TileEncoder
from xmag.models.vit import VisionTransformer
from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tiling import TileGrid, TilingSpec, iter_tile_batches, plan_tile_grid
from xmag.slide.tissue import DEFAULT_THUMBNAIL_UM_PER_PX, tissue_mask_for_slide
from xmag.training.config import HeadsConfig
from xmag.training.dataset import SlideDataset, read_dataset_csv
from xmag.training.extract import read_slide_list
from xmag.training.heads import EpochLog, mean_log_loss, predict_bags
from xmag.training.reports import FoldPredictions, summarise_task, write_reports
from xmag.training.splits import PARTS, Fold, patient_folds, read_clam_splits, write_clam_splits
from xmag.training.statistics import classification_metrics
from xmag.vocabulary import ReaderBackend

CHECKPOINT_FILE = "model.safetensors"
# Checkpoint metadata entry (and manifest provenance field): "<name> (encoder_weights_sha256 <hex>)" of the source.
FINE_TUNED_FROM = "fine_tuned_from"

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class E2EConfig:
    """The hyperparameters of e2e-XMAG; the head's (and the schedule, epochs, cap, seed) are a HeadsConfig's."""

    heads: HeadsConfig = field(default_factory=lambda: HeadsConfig(max_tiles_per_bag=64))
    frozen_blocks: int = 10  # the first N transformer blocks stay as they are
    encoder_learning_rate: float = 1e-5  # AdamW's peak rate for the trained blocks and the final norm
    gradient_checkpointing: bool = True
    eval_batch_size: int = 32  # tiles per encoder batch on whole bags
    precision: Precision = "auto"  # bf16 autocast where the hardware has it, else fp32
    device: str = "auto"  # cuda when torch sees a GPU, else cpu

    def __post_init__(self):
        if self.frozen_blocks < 0:
            raise ValueError(f"frozen_blocks must be at least 0, got {self.frozen_blocks}")
        if not self.encoder_learning_rate > 0 or self.eval_batch_size < 1:
            raise ValueError("encoder_learning_rate must be positive and eval_batch_size at least 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo) and torch has oneDNN.

    Elsewhere bf16 autocast still runs, emulated, and is slower than fp32.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: nothing to read the flags from, so no claim of bf16
        return False
    flags = next(
        (set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines() if line.startswith("flags")), set()
    )
    return torch.backends.mkldnn.is_available() and bool(flags & {"avx512_bf16", "amx_bf16"})


def choose_precision(requested: Precision, device: torch.device) -> tuple[str, str]:
    """("bf16" or "fp32", why): `auto` takes bf16 autocast where the hardware has bf16 arithmetic."""
    if requested != "auto":
        return requested, f"asked for ({requested})"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} has bf16"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no bf16"
    if cpu_has_native_bf16():
        return "bf16", "this CPU has native bf16 (avx512_bf16 or amx_bf16)"
    return "fp32", "this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag, or torch without oneDNN)"


class E2EModel(nn.Module):
    """A TileEncoder split at block `frozen_blocks`, and a GatedABMIL head on its class tokens.

    Everything before that block is frozen: its parameters do not require
    grad, it stays in eval mode whatever `train()` is told, and it runs under
    no_grad. The blocks from there on, the final norm and the head train.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        head: GatedABMIL,
        frozen_blocks: int,
        gradient_checkpointing: bool = True,
        precision: str = "fp32",
    ):
        super().__init__()
        check_frozen_blocks(frozen_blocks, vit.config.depth)
        if head.in_dim != vit.embed_dim:
            raise ValueError(f"the head takes {head.in_dim}-wide features but the encoder makes {vit.embed_dim}")
        self.encoder = TileEncoder(vit)
        self.head = head
        self.frozen_blocks = frozen_blocks
        self.gradient_checkpointing = gradient_checkpointing
        self.precision = precision
        for parameter in self.frozen_parameters():
            parameter.requires_grad_(False)
        self.train()

    @property
    def vit(self) -> VisionTransformer:
        return self.encoder.vit

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The parameters of everything before block `frozen_blocks`."""
        vit = self.vit
        tokens = [vit.cls_token, vit.pos_embed] + ([vit.reg_token] if vit.reg_token is not None else [])
        modules = [vit.patch_embed, *vit.blocks[: self.frozen_blocks]]
        return tokens + [parameter for module in modules for parameter in module.parameters()]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's trained parameters: blocks from `frozen_blocks` on, and the final norm."""
        modules = [*self.vit.blocks[self.frozen_blocks :], self.vit.norm]
        return [parameter for module in modules for parameter in module.parameters()]

    def train(self, mode: bool = True) -> E2EModel:
        super().train(mode)
        for module in (self.vit.patch_embed, *self.vit.blocks[: self.frozen_blocks]):
            module.eval()
        return self

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """Class tokens (B, D), float32, of uint8 NHWC tiles; under bf16 autocast when the model's precision says so."""
        autocast = (
            torch.autocast(tiles.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            with torch.no_grad():
                x = self.vit.prepare_tokens(self.encoder.normalise(tiles))
                for block in self.vit.blocks[: self.frozen_blocks]:
                    x = block(x)
            for block in self.vit.blocks[self.frozen_blocks :]:
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    # Non-reentrant: the reentrant form is an autograd Function whose output needs grad only if an
                    # input does, and x comes from the no_grad frozen part, so it would give this block's (and every
                    # later block's) parameters no gradient at all. The non-reentrant form tracks the parameters.
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            class_tokens = self.vit.norm(x)[:, 0]
        return class_tokens.float()

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (num_classes,) and attention (N,) of one bag of uint8 tiles (N, S, S, 3)."""
        return self.head(self.encode(tiles))


def check_frozen_blocks(frozen_blocks: int, depth: int, encoder_name: str = "the encoder") -> None:
    """ValueError unless 0 <= frozen_blocks < depth: at least one block must be left to train."""
    if not 0 <= frozen_blocks < depth:
        raise ValueError(
            f"--frozen-blocks {frozen_blocks} does not fit: {encoder_name} has {depth} transformer blocks; "
            f"freeze 0 to {depth - 1} of them, so that at least one block is trained"
        )


def build_head(config: HeadsConfig, embed_dim: int, num_classes: int) -> GatedABMIL:
    """The head's initial weights: the same for a seed, without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return GatedABMIL(
            in_dim=embed_dim,
            hidden_dim=config.hidden_dim,
            attention_dim=config.attention_dim,
            num_classes=num_classes,
            dropout=config.dropout,
        )


@dataclass(frozen=True)
class SlideTiles:
    """One slide's tissue tiles, planned once as serving plans them."""

    slide_id: str
    path: Path
    grid: TileGrid


def plan_slide_tiles(
    slide_id: str, path: Path, spec: TilingSpec, backend: ReaderBackend = "openslide", fallback_mpp: float | None = None
) -> SlideTiles:
    """Open the slide, resolve its µm/px, find its tissue and plan its grid: the steps of `embed_slide`."""
    with open_slide(path, backend=backend) as reader:
        mpp = resolve_mpp(reader.info, fallback_mpp, str(path))
        tissue, _ = tissue_mask_for_slide(reader, mpp, DEFAULT_THUMBNAIL_UM_PER_PX)
        return SlideTiles(slide_id, Path(path), plan_tile_grid(reader.info, mpp, tissue, spec))


def read_tiles(
    slide: SlideTiles, indices: np.ndarray, batch_size: int, backend: ReaderBackend = "openslide"
) -> Iterator[np.ndarray]:
    """uint8 NHWC batches of the grid's tiles at `indices`, read and resized as serving reads them."""
    subset = dataclasses.replace(slide.grid, level0_coords=slide.grid.level0_coords[indices])
    with open_slide(slide.path, backend=backend) as reader:
        for tiles, _ in iter_tile_batches(reader, subset, batch_size):
            yield tiles


@torch.no_grad()
def embed_whole_slide(
    model: E2EModel, slide: SlideTiles, batch_size: int, backend: ReaderBackend = "openslide"
) -> np.ndarray:
    """Class tokens (N, D) float32 of every tile of the slide, in batches, in eval mode (the mode is restored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        rows = [np.empty((0, model.vit.embed_dim), np.float32)]
        for tiles in read_tiles(slide, np.arange(len(slide.grid)), batch_size, backend):
            rows.append(model.encode(torch.from_numpy(tiles).to(device)).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows)


@dataclass(frozen=True)
class ActivationMemory:
    """Memory of one training step on one bag, with and without gradient checkpointing.

    `saved_bytes_*`: the bytes of the distinct storages that autograd saved
    for backward during the forward pass, counted by a
    `torch.autograd.graph.saved_tensors_hooks` pack hook; parameters are left
    out (they exist anyway), autocast's bf16 copies of them count. With checkpointing that is what a checkpointed
    block keeps (its input) plus the head's saved tensors; the recomputation in
    backward briefly holds one block's activations again, which this count
    does not see. It works on any device. On CUDA the allocator's peak over
    the whole step (`torch.cuda.max_memory_allocated`, forward and backward,
    recomputation and gradients included) is the better measure:
    `cuda_peak_bytes_*`, None elsewhere.
    """

    tiles: int
    saved_bytes_checkpointed: int
    saved_bytes_plain: int
    cuda_peak_bytes_checkpointed: int | None
    cuda_peak_bytes_plain: int | None

    def describe(self) -> str:
        """One line per measure, in MiB."""
        lines = [
            f"activations saved for backward, one step of {self.tiles} tiles: "
            f"{self.saved_bytes_checkpointed / 2**20:.1f} MiB with gradient checkpointing, "
            f"{self.saved_bytes_plain / 2**20:.1f} MiB without"
        ]
        if self.cuda_peak_bytes_checkpointed is not None and self.cuda_peak_bytes_plain is not None:
            lines.append(
                f"CUDA peak allocated over the step: {self.cuda_peak_bytes_checkpointed / 2**20:.1f} MiB with, "
                f"{self.cuda_peak_bytes_plain / 2**20:.1f} MiB without"
            )
        return "\n".join(lines)


def measure_activation_memory(model: E2EModel, tiles: torch.Tensor, label: int) -> ActivationMemory:
    """One forward and backward pass on a bag of tiles, with and without checkpointing; see ActivationMemory.

    The model's weights are untouched (no optimiser step, gradients cleared),
    and so is the global random state (the head's dropout draws from a fork).
    """
    measured: dict[bool, tuple[int, int | None]] = {}
    was_checkpointing, was_training = model.gradient_checkpointing, model.training
    try:
        for checkpointed in (True, False):
            model.gradient_checkpointing = checkpointed
            measured[checkpointed] = _one_step_memory(model, tiles, label)
    finally:
        model.gradient_checkpointing = was_checkpointing
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return ActivationMemory(len(tiles), measured[True][0], measured[False][0], measured[True][1], measured[False][1])


def _one_step_memory(model: E2EModel, tiles: torch.Tensor, label: int) -> tuple[int, int | None]:
    parameter_storages = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
        return tensor

    cuda = tiles.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(tiles.device)
        torch.cuda.reset_peak_memory_stats(tiles.device)
        baseline_bytes = torch.cuda.memory_allocated(tiles.device)
    model.zero_grad(set_to_none=True)
    model.train()
    with torch.random.fork_rng(devices=[tiles.device.index or 0] if cuda else []):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logits, _ = model(tiles)
            loss = functional.cross_entropy(logits[None], torch.tensor([label], device=tiles.device))
        loss.backward()
    peak_bytes = torch.cuda.max_memory_allocated(tiles.device) - baseline_bytes if cuda else None
    model.zero_grad(set_to_none=True)
    return sum(saved.values()), peak_bytes


@dataclass(frozen=True)
class E2ERun:
    """Everything `train_e2e` needs, as the command line gives it."""

    dataset_csv: Path
    encoder: Path  # the model repository or checkpoint to fine-tune
    output_dir: Path
    slide_dir: Path | None = None  # where the CSV's slide ids find their slide files
    config: E2EConfig = field(default_factory=E2EConfig)
    task: str | None = None  # the label column; default: the CSV's only one
    class_order: list[str] | None = None  # the task's classes in logit order; default sorted names
    ordinal: bool = False
    fold: int = 0
    folds: int = 5
    splits_dir: Path | None = None  # CLAM split files; splits_<fold>.csv is used
    bootstrap_resamples: int = 1000
    encoder_format: str = "auto"
    encoder_config: str = "xmag_vitb14"
    description: str = ""  # provenance description; default: what the run was
    reader_backend: ReaderBackend = "openslide"
    fallback_mpp: float | None = None  # for slides that state no resolution
    measure_memory: bool = False


@dataclass(frozen=True)
class E2EProgress:
    """Where an epoch is: slides done of its training steps then its validation; `log` once it is over."""

    epoch: int
    max_epochs: int
    slides_done: int
    slides_total: int
    log: EpochLog | None = None


def train_e2e(run: E2ERun, on_progress: Callable[[E2EProgress], None] | None = None) -> dict:
    """Fine-tune the encoder's last blocks with an ABMIL head on one fold; write the run directory (module docstring).

    Returns the summary written as metrics.json. Raises ValueError for a bad
    configuration (frozen_blocks not below the encoder's depth, a fold out of
    range, a training part missing a class, a slide without tissue).
    """
    config = run.config
    source = load_encoder_weights(run.encoder, run.encoder_format, run.encoder_config)
    check_frozen_blocks(config.frozen_blocks, source.vit.config.depth, f"the encoder {source.name}")
    dataset, task = _read_dataset(run)
    folds = read_clam_splits(run.splits_dir, dataset) if run.splits_dir else _our_folds(dataset, task, run)
    parts, labelled = _fold_parts(folds, run.fold, dataset, task)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    write_clam_splits(run.output_dir / "splits", folds, dataset, task)
    started = time.perf_counter()
    slides = _plan_slides(run, [slide_id for part in parts.values() for slide_id in part], source.spec)
    planning_s = time.perf_counter() - started

    device = _device(config.device)
    precision, precision_reason = choose_precision(config.precision, device)
    class_names = dataset.class_names[task]
    head = build_head(config.heads, source.vit.embed_dim, len(class_names))
    model = E2EModel(source.vit, head, config.frozen_blocks, config.gradient_checkpointing, precision).to(device)
    memory = _measure(model, slides[parts["train"][0]], labelled, run, device) if run.measure_memory else None
    started = time.perf_counter()
    trained = _fit(model, slides, labelled, parts, run, device, on_progress)
    training_s = time.perf_counter() - started
    predictions = _predict_test(model, slides, labelled, parts["test"], dataset, run, trained)
    model.to("cpu")

    checkpoint_path = run.output_dir / CHECKPOINT_FILE
    description = _save_checkpoint(model, checkpoint_path, source, task, class_names, run, len(parts["train"]))
    stages = _blocks(config.frozen_blocks, source.vit.config.depth)
    summary = {
        "tasks": {
            task: summarise_task(
                [predictions],
                class_names,
                ordinal=run.ordinal,
                resamples=run.bootstrap_resamples,
                seed=config.heads.seed,
            )
        },
        "encoder": {
            "name": f"{source.name} fine-tuned (e2e)",
            "weights_sha256": encoder_weights_sha256(model.vit),
            "provenance_kind": source.provenance_kind,
            "fine_tuned_from": {"name": source.name, "weights_sha256": source.sha256},
        },
        "features_notice": (
            f"e2e-XMAG: no feature files; the encoder was fine-tuned ({stages} and the final norm trained) on tiles "
            f"read from the slides. One fold was trained (fold {run.fold} of {len(folds)}): the metrics are its "
            "held-out test slides'."
        ),
        "checkpoint": {"path": CHECKPOINT_FILE, "sha256": sha256_of(checkpoint_path), "description": description},
        "folds": len(folds),
        "fold": run.fold,
        "slides": len(labelled),
        "patients": len({slide.case_id for slide in dataset.labelled(task)}),
        "e2e": {
            "best_epoch": trained.best_epoch,
            "epochs_run": len(trained.history),
            "stopped_early": trained.stopped_early,
            "precision": precision,
            "device": device.type,
            "seconds": {"planning": planning_s, "training": training_s},
            "memory": asdict(memory) if memory is not None else None,
        },
    }
    record = _config_record(run, dataset, task, source, precision, precision_reason, device, parts)
    write_reports(run.output_dir, summary, {task: [predictions]}, {task: class_names}, record)
    return summary


def _fold_parts(
    folds: list[Fold], fold_index: int, dataset: SlideDataset, task: str
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The fold's labelled slide ids per part, and every labelled slide's class index; ValueError if it cannot train."""
    if not 0 <= fold_index < len(folds):
        raise ValueError(f"--fold {fold_index} is out of range: there are {len(folds)} folds (0 to {len(folds) - 1})")
    fold = folds[fold_index]
    labelled = {slide.slide_id: dataset.label_index(slide, task) for slide in dataset.labelled(task)}
    parts = {name: [slide_id for slide_id in fold.part(name) if slide_id in labelled] for name in PARTS}
    counts = np.bincount([labelled[slide_id] for slide_id in parts["train"]], minlength=len(dataset.class_names[task]))
    if (counts == 0).any() or not parts["val"]:
        raise ValueError(
            f"fold {fold_index}: the training part has {counts.tolist()} slides per class and the validation part "
            f"{len(parts['val'])}; training needs every class, and early stopping a validation part"
        )
    return parts, labelled


def _plan_slides(run: E2ERun, slide_ids: list[str], spec: TilingSpec) -> dict[str, SlideTiles]:
    paths = {entry.slide_id: entry.path for entry in read_slide_list(run.dataset_csv, run.slide_dir)}
    slides = {
        slide_id: plan_slide_tiles(slide_id, paths[slide_id], spec, run.reader_backend, run.fallback_mpp)
        for slide_id in slide_ids
    }
    empty = sorted(slide_id for slide_id, slide in slides.items() if len(slide.grid) == 0)
    if empty:
        raise ValueError(f"{len(empty)} slides have no tissue tiles: {', '.join(empty[:5])}; leave them out of the CSV")
    return slides


def _predict_test(model, slides, labelled, test_ids, dataset: SlideDataset, run: E2ERun, trained) -> FoldPredictions:
    """The fold's test slides on whole bags, with the weights of the best validation loss."""
    bags = [
        embed_whole_slide(model, slides[slide_id], run.config.eval_batch_size, run.reader_backend)
        for slide_id in test_ids
    ]
    case_of = {slide.slide_id: slide.case_id for slide in dataset.slides}
    head = copy.deepcopy(model.head).cpu()
    return FoldPredictions(
        fold=run.fold,
        slide_ids=test_ids,
        case_ids=[case_of[slide_id] for slide_id in test_ids],
        labels=np.array([labelled[slide_id] for slide_id in test_ids], dtype=np.int64),
        probabilities=predict_bags(head, bags) if bags else np.zeros((0, head.num_classes)),
        best_epoch=trained.best_epoch,
        epochs_run=len(trained.history),
        history=[asdict(log) for log in trained.history],
    )


def _save_checkpoint(
    model: E2EModel, path: Path, source: EncoderWeights, task: str, class_names: list[str], run: E2ERun, slides: int
) -> str:
    """Write the XMAG checkpoint of the fine-tuned encoder and its head; returns its provenance description."""
    stages = _blocks(run.config.frozen_blocks, source.vit.config.depth)
    description = run.description or (
        f"e2e-XMAG: the encoder {source.name} fine-tuned end to end ({stages} and the final norm trained, everything "
        f"before frozen) jointly with an ABMIL head for {task}, by xmag train e2e on {slides} slides of "
        f"{run.dataset_csv.name} (fold {run.fold}); source encoder weights sha256 {source.sha256}"
    )
    save_encoder_checkpoint(
        model.vit,
        path,
        metadata={
            "provenance_kind": source.provenance_kind,
            "provenance_description": description,
            "encoder_provenance": source.description,
            FINE_TUNED_FROM: f"{source.name} (encoder_weights_sha256 {source.sha256})",
        },
        heads=SlideHeads({task: model.head}, {task: class_names}),
        # The heads were trained on the fine-tuned encoder's features, so they name it, not the source.
        heads_encoder_sha256=encoder_weights_sha256(model.vit),
    )
    return description


def _read_dataset(run: E2ERun) -> tuple[SlideDataset, str]:
    """The dataset CSV with the one task e2e trains: the one asked for, or the CSV's only label column."""
    task = run.task
    if task is None:
        columns = sorted(read_dataset_csv(run.dataset_csv).class_names)
        if len(columns) != 1:
            raise ValueError(
                f"{run.dataset_csv} has the label columns {columns}: say which one to train with --task "
                "(e2e fine-tunes the encoder for one task)"
            )
        task = columns[0]
    class_order = {task: run.class_order} if run.class_order else {}
    return read_dataset_csv(run.dataset_csv, [task], class_order, [task] if run.ordinal else []), task


def _our_folds(dataset: SlideDataset, task: str, run: E2ERun) -> list[Fold]:
    # The seed and k of `xmag train heads`, so its fold i and ours hold the same patients.
    return patient_folds(dataset, task, k=run.folds, seed=run.config.heads.seed)


def _device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda, but torch {torch.__version__} sees no CUDA GPU")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _measure(model: E2EModel, slide: SlideTiles, labelled: dict[str, int], run: E2ERun, device) -> ActivationMemory:
    """Activation memory of one training step on the first training slide's capped bag."""
    indices = _capped_indices(
        len(slide.grid), run.config.heads.max_tiles_per_bag, np.random.default_rng(run.config.heads.seed)
    )
    tiles = np.concatenate(list(read_tiles(slide, indices, len(indices), run.reader_backend)))
    return measure_activation_memory(model, torch.from_numpy(tiles).to(device), labelled[slide.slide_id])


@dataclass
class _Trained:
    best_epoch: int = 0
    history: list[EpochLog] = field(default_factory=list)
    stopped_early: bool = False


def _fit(model, slides, labelled, parts, run: E2ERun, device, on_progress) -> _Trained:
    """The epochs of the recipe; leaves the model with the weights of the best validation loss."""
    heads_config = run.config.heads
    train_ids, val_ids = parts["train"], parts["val"]
    train_labels = np.array([labelled[slide_id] for slide_id in train_ids])
    val_labels = np.array([labelled[slide_id] for slide_id in val_ids])
    num_classes = model.head.num_classes
    counts = np.bincount(train_labels, minlength=num_classes)
    class_weights = torch.tensor(len(train_labels) / (num_classes * counts), dtype=torch.float32, device=device)
    total_slides = len(train_ids) + len(val_ids)

    def progress(epoch: int, done: int, log: EpochLog | None = None) -> None:
        if on_progress is not None:
            on_progress(E2EProgress(epoch, heads_config.max_epochs, done, total_slides, log))

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(heads_config.seed)  # the head's dropout
        optimiser = torch.optim.AdamW(
            [
                {"params": model.encoder_parameters(), "lr": run.config.encoder_learning_rate},
                {"params": list(model.head.parameters()), "lr": heads_config.learning_rate},
            ],
            weight_decay=heads_config.weight_decay,
        )
        steps_per_epoch = math.ceil(len(train_ids) / heads_config.bags_per_batch)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=heads_config.max_epochs * steps_per_epoch
        )
        trained = _Trained()
        best_loss, best_state = math.inf, _trained_state(model)
        for epoch in range(1, heads_config.max_epochs + 1):
            rng = np.random.default_rng([heads_config.seed, epoch])
            model.train()
            losses, done = [], 0
            order = rng.permutation(len(train_ids))
            for start in range(0, len(order), heads_config.bags_per_batch):
                batch = order[start : start + heads_config.bags_per_batch]
                # The batch's weighted mean cross-entropy, one bag at a time: sum_i w_i l_i / sum_i w_i.
                weight_sum = class_weights[torch.as_tensor(train_labels[batch], device=device)].sum()
                optimiser.zero_grad()
                batch_loss = 0.0
                for index in batch:
                    slide = slides[train_ids[index]]
                    indices = _capped_indices(len(slide.grid), heads_config.max_tiles_per_bag, rng)
                    tiles = np.concatenate(list(read_tiles(slide, indices, len(indices), run.reader_backend)))
                    logits, _ = model(torch.from_numpy(tiles).to(device))
                    label = torch.tensor([train_labels[index]], device=device)
                    loss = class_weights[label[0]] * functional.cross_entropy(logits[None], label) / weight_sum
                    loss.backward()
                    batch_loss += loss.item()
                    done += 1
                    progress(epoch, done)
                optimiser.step()
                schedule.step()
                losses.append(batch_loss * len(batch))
            val_bags = []
            for slide_id in val_ids:
                val_bags.append(
                    embed_whole_slide(model, slides[slide_id], run.config.eval_batch_size, run.reader_backend)
                )
                done += 1
                progress(epoch, done)
            val_probabilities = predict_bags(copy.deepcopy(model.head).cpu(), val_bags)
            val_loss = mean_log_loss(val_probabilities, val_labels)
            log = EpochLog(
                epoch=epoch,
                train_loss=sum(losses) / len(train_ids),
                val_loss=val_loss,
                val_auc=classification_metrics(val_labels, val_probabilities)["auc"],
                learning_rate=schedule.get_last_lr()[1],  # the head's; the encoder's follows the same cosine
            )
            trained.history.append(log)
            progress(epoch, done, log)
            if val_loss < best_loss:
                best_loss, best_state, trained.best_epoch = val_loss, _trained_state(model), epoch
            elif epoch - trained.best_epoch >= heads_config.patience:
                trained.stopped_early = True
                break
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in best_state:
                parameter.copy_(best_state[name])
    return trained


def _trained_state(model: E2EModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _capped_indices(tiles: int, max_tiles: int, rng: np.random.Generator) -> np.ndarray:
    if tiles <= max_tiles:
        return np.arange(tiles)
    return np.sort(rng.choice(tiles, size=max_tiles, replace=False))


def _config_record(run, dataset, task, source: EncoderWeights, precision, precision_reason, device, parts) -> dict:
    config = run.config
    depth = source.vit.config.depth
    return {
        "recipe": "e2e-XMAG",
        "dataset_csv": str(run.dataset_csv),
        "dataset_sha256": sha256_of(run.dataset_csv),
        "slide_dir": str(run.slide_dir) if run.slide_dir else None,
        "encoder": str(run.encoder),
        "encoder_name": source.name,
        "encoder_weights_sha256": source.sha256,
        "splits_dir": str(run.splits_dir) if run.splits_dir else None,
        "fold": run.fold,
        "folds": run.folds if run.splits_dir is None else None,
        "task": task,
        "class_names": dataset.class_names[task],
        "ordinal": run.ordinal,
        "slides_per_part": {name: len(ids) for name, ids in parts.items()},
        "e2e": asdict(config),
        "frozen": "patch embedding, position embedding, class and register tokens"
        + (f", {_blocks(0, config.frozen_blocks)}" if config.frozen_blocks else ""),
        "trained": f"{_blocks(config.frozen_blocks, depth)}, final norm, ABMIL head",
        "precision": precision,
        "precision_reason": precision_reason,
        "device": device.type,
        "tiling": asdict(source.spec),
        "reader_backend": run.reader_backend,
        "fallback_mpp": run.fallback_mpp,
        "bootstrap_resamples": run.bootstrap_resamples,
        "class_weighting": "loss (inverse class frequency in the training part)",
        "xmag_version": __version__,
        "torch_version": torch.__version__,
    }


def _blocks(first: int, stop: int) -> str:
    """'block 3' or 'blocks 3-11': the transformer blocks first..stop-1, for descriptions."""
    return f"block {first}" if stop - first == 1 else f"blocks {first}-{stop - 1}"
