"""The distillation objective: what the 5x student is asked to reproduce of the 20x teacher, and the loss.

One training pair is a region of 896 x 896 px at 20x and the same region at 5x (224 x 224 px). The
teacher (UNI2-h) sees the 20x region as 16 crops of 224 px cut row-major; each crop gives one class
token. The student (DINOv2 ViT-B/14) sees the 5x view once and gives a class token and 16 x 16
patch tokens. Two targets follow (../shared/TRAINING.md, "Distillation recipe"):

    global: the student's class token       -> global head -> the mean of the 16 teacher class tokens
    local:  the student's patch tokens, mean-pooled in 4 x 4 blocks into 16 cells (row-major)
                                             -> local head  -> the class token of the teacher crop
                                                               that covers the same area

    loss = global_weight * -cos(global) + local_weight * mean over cells of -cos(local)

with weights 1 and 0.5 in the paper. Each 5x view pairs only with its own 20x region, and cell i
only with crop i: there are no negatives and no pairing across the batch.

The heads (Linear -> BatchNorm1d -> GELU -> Linear, student width to teacher width) exist only for
training: the released model is the student backbone alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional

# The 896 px region at 20x is cut into a 4 x 4 grid of 224 px teacher crops.
CELLS_PER_SIDE = 4
CROPS_PER_REGION = CELLS_PER_SIDE * CELLS_PER_SIDE
# The student's 224 px input at patch 14 px.
STUDENT_GRID = 16


class ProjectionHead(nn.Module):
    """Linear(in -> out) -> BatchNorm1d(out) -> GELU -> Linear(out -> out).

    Accepts (B, in_dim) or (B, K, in_dim); the K tokens of every sample are normalised together with
    the batch (BatchNorm sees B * K rows), and the output keeps the input's leading shape.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        _check_width("in_dim", in_dim)
        _check_width("out_dim", out_dim)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.norm = nn.BatchNorm1d(out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim), with one or two leading dimensions."""
        if features.ndim not in (2, 3) or features.shape[-1] != self.in_dim:
            raise ValueError(
                f"expected features of shape (B, {self.in_dim}) or (B, K, {self.in_dim}), got {tuple(features.shape)}"
            )
        rows = features.reshape(-1, self.in_dim)
        if self.training and rows.shape[0] < 2:
            # BatchNorm's batch variance needs two rows; torch's own message does not say which head failed.
            raise ValueError(
                f"a ProjectionHead in training mode needs at least 2 rows for its BatchNorm, got {rows.shape[0]}"
            )
        projected = self.fc2(self.act(global_batch_norm(self.norm, self.fc1(rows))))
        return projected.reshape(*features.shape[:-1], self.out_dim)


def global_batch_norm(norm: nn.BatchNorm1d, rows: torch.Tensor) -> torch.Tensor:
    """`norm` over the rows of every process: W processes of B / W regions normalise as one process of B.

    In one process, or in eval mode, this is `norm(rows)`. In training under
    torch.distributed with several processes, the rows' sums, then their
    squared deviations from the global mean, are all-reduced with autograd
    (torch.distributed.nn), so the gradient flows through the global statistics
    as it would in one process; SyncBatchNorm does the same but runs on CUDA
    only. Two passes, not E[x²] - E[x]²: an untrained student gives regions
    nearly the same features, whose variance that difference would lose to
    rounding. The running statistics move by the global mean and unbiased
    variance, as BatchNorm1d's would.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not norm.training or not distributed or torch.distributed.get_world_size() == 1:
        return norm(rows)
    from torch.distributed.nn.functional import all_reduce

    count = torch.full((1,), float(rows.shape[0]), dtype=rows.dtype, device=rows.device)
    totals = all_reduce(torch.cat([rows.sum(dim=0), count]))
    rows_total = totals[-1]
    mean = totals[:-1] / rows_total
    centred = rows - mean
    variance = all_reduce((centred * centred).sum(dim=0)) / rows_total
    if norm.track_running_stats and norm.running_mean is not None and norm.running_var is not None:
        with torch.no_grad():
            momentum = norm.momentum if norm.momentum is not None else 0.1
            unbiased = variance * rows_total / (rows_total - 1)
            norm.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            norm.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
            if norm.num_batches_tracked is not None:
                norm.num_batches_tracked.add_(1)
    normalised = centred / torch.sqrt(variance + norm.eps)
    return normalised * norm.weight + norm.bias if norm.affine else normalised


class DistillationHeads(nn.Module):
    """The two projection heads from the student's width to the teacher's: `global_head`, `local_head`."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.global_head = ProjectionHead(student_dim, teacher_dim)
        self.local_head = ProjectionHead(student_dim, teacher_dim)

    def forward(self, student_class: torch.Tensor, student_cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class token (B, Ds), cells (B, 16, Ds)) -> (global prediction (B, Dt), local predictions (B, 16, Dt))."""
        return self.global_head(student_class), self.local_head(student_cells)


class LossParts(NamedTuple):
    """The weighted loss and its two unweighted terms (each a mean negative cosine, in [-1, 1]), fp32 scalars."""

    total: torch.Tensor
    global_term: torch.Tensor
    local_term: torch.Tensor


def pooled_cells(patch_tokens: torch.Tensor, grid: int = STUDENT_GRID, cells: int = CELLS_PER_SIDE) -> torch.Tensor:
    """Mean-pool (B, grid*grid, D) raster-order patch tokens into (B, cells*cells, D) square cells.

    Cell index = row * cells + col, rows top to bottom: the order in which the teacher's crops are cut
    from the 20x region, so cell i and crop i cover the same tissue. With the defaults, 16 x 16 patch
    tokens become 16 cells of 4 x 4 tokens each.
    """
    _check_width("grid", grid)
    _check_width("cells", cells)
    if grid % cells != 0:
        raise ValueError(f"a grid of {grid} patches per side does not divide into {cells} cells per side")
    if patch_tokens.ndim != 3 or patch_tokens.shape[1] != grid * grid:
        raise ValueError(
            f"expected patch tokens of shape (B, {grid * grid}, D) for a {grid}x{grid} grid, "
            f"got {tuple(patch_tokens.shape)}"
        )
    batch, _, width = patch_tokens.shape
    per_cell = grid // cells
    # Token (row, col) with row = cell_row * per_cell + row_in_cell, and the same for columns.
    blocks = patch_tokens.reshape(batch, cells, per_cell, cells, per_cell, width)
    return blocks.mean(dim=(2, 4)).reshape(batch, cells * cells, width)


def teacher_targets(crop_class_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 16, Dt) teacher class tokens of the row-major crops -> (global (B, Dt), local (B, 16, Dt)), fp32.

    The global target is the mean of the 16 crops' class tokens; the local targets are the tokens
    themselves. Computed in fp32 because the tokens may arrive in fp16 (a teacher-embedding cache) or
    bf16 (an autocast teacher). The results are plain tensors, usable in the loss even when the
    teacher ran under `torch.inference_mode`.
    """
    if crop_class_tokens.ndim != 3 or crop_class_tokens.shape[1] != CROPS_PER_REGION:
        raise ValueError(
            f"expected teacher class tokens of shape (B, {CROPS_PER_REGION}, Dt), one per crop, "
            f"got {tuple(crop_class_tokens.shape)}"
        )
    if not crop_class_tokens.is_floating_point():
        raise ValueError(f"expected floating-point teacher class tokens, got dtype {crop_class_tokens.dtype}")
    # copy=True: a tensor made under inference_mode cannot be saved for backward; a copy made here can.
    local = crop_class_tokens.detach().to(torch.float32, copy=True)
    return local.mean(dim=1), local


def negative_cosine_terms(
    pred_global: torch.Tensor,
    pred_local: torch.Tensor,
    teacher_global: torch.Tensor,
    teacher_local: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over the batch of -cos(pred_global, teacher_global), mean over batch and cells of -cos(local)).

    Shapes: predictions and targets (B, Dt) and (B, K, Dt), paired element by element (sample b with
    sample b, cell i with crop i). The cosine is taken in fp32 with autocast off: under bf16 autocast
    the heads' outputs carry 8 significant bits, and near convergence (cosines close to 1) the loss
    and its gradient would be mostly rounding.
    """
    if pred_global.ndim != 2 or pred_global.shape != teacher_global.shape:
        raise ValueError(
            f"global predictions {tuple(pred_global.shape)} and targets {tuple(teacher_global.shape)} "
            "must both be (B, Dt)"
        )
    if pred_local.ndim != 3 or pred_local.shape != teacher_local.shape:
        raise ValueError(
            f"local predictions {tuple(pred_local.shape)} and targets {tuple(teacher_local.shape)} "
            "must both be (B, K, Dt)"
        )
    if pred_local.shape[0] != pred_global.shape[0] or pred_local.shape[2] != pred_global.shape[1]:
        raise ValueError(
            f"global (B, Dt) = {tuple(pred_global.shape)} and local (B, K, Dt) = {tuple(pred_local.shape)} "
            "disagree on B or Dt"
        )
    tensors = (pred_global, pred_local, teacher_global, teacher_local)
    if not all(tensor.is_floating_point() for tensor in tensors):
        raise ValueError(f"expected floating-point inputs, got dtypes {[tensor.dtype for tensor in tensors]}")
    with torch.autocast(device_type=pred_global.device.type, enabled=False):
        global_cos = functional.cosine_similarity(pred_global.float(), _plain_target(teacher_global), dim=-1)
        local_cos = functional.cosine_similarity(pred_local.float(), _plain_target(teacher_local), dim=-1)
    return -global_cos.mean(), -local_cos.mean()


def distillation_loss(
    student_class: torch.Tensor,
    student_cells: torch.Tensor,
    heads: DistillationHeads,
    teacher_global: torch.Tensor,
    teacher_local: torch.Tensor,
    global_weight: float = 1.0,
    local_weight: float = 0.5,
) -> LossParts:
    """The paper's loss for a batch: global_weight * global term + local_weight * local term.

    `student_class` (B, Ds) is the student's normed class token, `student_cells` (B, 16, Ds) its
    `pooled_cells`; the targets come from `teacher_targets`. Both heads run here, so their BatchNorm
    follows the heads' train/eval mode.
    """
    for name, weight in (("global_weight", global_weight), ("local_weight", local_weight)):
        if not (weight >= 0.0 and weight < float("inf")):
            raise ValueError(f"{name} must be a finite number >= 0, got {weight}")
    if student_class.ndim != 2 or student_class.shape[1] != heads.student_dim:
        raise ValueError(
            f"expected student class tokens of shape (B, {heads.student_dim}), got {tuple(student_class.shape)}"
        )
    expected_cells = (student_class.shape[0], CROPS_PER_REGION, heads.student_dim)
    if tuple(student_cells.shape) != expected_cells:
        raise ValueError(f"expected student cells of shape {expected_cells}, got {tuple(student_cells.shape)}")
    pred_global, pred_local = heads(student_class, student_cells)
    global_term, local_term = negative_cosine_terms(pred_global, pred_local, teacher_global, teacher_local)
    return LossParts(global_weight * global_term + local_weight * local_term, global_term, local_term)


def _plain_target(target: torch.Tensor) -> torch.Tensor:
    # Targets carry no gradient; an inference-mode tensor is cloned because autograd cannot save it.
    plain = target.detach().float()
    return plain.clone() if plain.is_inference() else plain


def _check_width(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
