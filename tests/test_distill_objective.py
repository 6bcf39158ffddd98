"""The distillation objective: cell order against the teacher's crop order, the loss's value at known points,
its pairing, fp32 under bf16, gradients, and the heads' BatchNorm in train and eval modes."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from xmag.models.vit import VisionTransformer, get_vit_config
from xmag.training.distill_objective import (
    DistillationHeads,
    ProjectionHead,
    distillation_loss,
    negative_cosine_terms,
    pooled_cells,
    teacher_targets,
)

STUDENT_DIM = 12
TEACHER_DIM = 20


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pooled_cells_are_row_major_4x4_blocks():
    # Patch (row, col) of a 16 x 16 raster carries the values (row, col, 100 * row + col).
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    tokens = torch.stack([rows, cols, 100 * rows + cols], dim=-1).reshape(1, 256, 3)
    cells = pooled_cells(tokens)
    assert cells.shape == (1, 16, 3)
    for cell in range(16):
        cell_row, cell_col = divmod(cell, 4)
        # The mean of rows 4r..4r+3 is 4r + 1.5; the same for columns.
        expected_row, expected_col = 4 * cell_row + 1.5, 4 * cell_col + 1.5
        assert cells[0, cell].tolist() == [expected_row, expected_col, 100 * expected_row + expected_col]


def test_pooled_cells_is_the_mean_of_each_block():
    tokens = torch.randn(2, 64, 5, generator=_generator())
    cells = pooled_cells(tokens, grid=8, cells=2)
    raster = tokens.reshape(2, 8, 8, 5)
    expected = torch.stack(
        [raster[:, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].mean(dim=(1, 2)) for r in range(2) for c in range(2)], dim=1
    )
    torch.testing.assert_close(cells, expected)


def test_pooled_cells_on_the_student_backbone():
    vit = VisionTransformer(get_vit_config("tiny_dinov2")).eval()
    with torch.no_grad():
        patches = vit.forward_features(torch.randn(2, 3, 224, 224, generator=_generator()))["x_norm_patchtokens"]
    assert pooled_cells(patches).shape == (2, 16, vit.embed_dim)


@pytest.mark.parametrize(
    ("shape", "grid", "cells", "message"),
    [
        ((2, 255, 4), 16, 4, r"\(B, 256, D\)"),
        ((2, 256), 16, 4, r"\(B, 256, D\)"),
        ((2, 36, 4), 6, 4, "does not divide"),
        ((2, 256, 4), 16, 0, "cells must be a positive integer"),
    ],
)
def test_pooled_cells_refuses_bad_shapes(shape, grid, cells, message):
    with pytest.raises(ValueError, match=message):
        pooled_cells(torch.zeros(shape), grid=grid, cells=cells)


def test_teacher_targets_are_the_crop_mean_and_the_crops():
    crops = torch.randn(3, 16, TEACHER_DIM, generator=_generator()).half()
    global_target, local_target = teacher_targets(crops)
    assert global_target.dtype == local_target.dtype == torch.float32
    torch.testing.assert_close(local_target, crops.float())
    torch.testing.assert_close(global_target, crops.float().mean(dim=1))
    with pytest.raises(ValueError, match=r"\(B, 16, Dt\)"):
        teacher_targets(torch.zeros(3, 15, TEACHER_DIM))
    with pytest.raises(ValueError, match="floating-point"):
        teacher_targets(torch.zeros(3, 16, TEACHER_DIM, dtype=torch.int64))


def test_a_perfect_prediction_scores_minus_one_per_term():
    global_target, local_target = teacher_targets(torch.randn(4, 16, TEACHER_DIM, generator=_generator()))
    global_term, local_term = negative_cosine_terms(global_target, local_target, global_target, local_target)
    assert global_term.item() == pytest.approx(-1.0, abs=1e-6)
    assert local_term.item() == pytest.approx(-1.0, abs=1e-6)
    # Cosine ignores scale: a prediction twice the target is as good.
    scaled = negative_cosine_terms(2 * global_target, 3 * local_target, global_target, local_target)
    assert [term.item() for term in scaled] == pytest.approx([-1.0, -1.0], abs=1e-6)


@pytest.mark.parametrize("heads_training", [True, False])
def test_the_loss_of_targets_equal_to_the_heads_outputs_is_minus_the_weight_sum(heads_training):
    heads = DistillationHeads(STUDENT_DIM, TEACHER_DIM).train(heads_training)
    student_class = torch.randn(4, STUDENT_DIM, generator=_generator(1))
    student_cells = torch.randn(4, 16, STUDENT_DIM, generator=_generator(2))
    with torch.no_grad():
        teacher_global, teacher_local = heads(student_class, student_cells)
    parts = distillation_loss(
        student_class, student_cells, heads, teacher_global, teacher_local, global_weight=1.0, local_weight=0.5
    )
    assert parts.total.item() == pytest.approx(-1.5, abs=1e-5)
    assert parts.global_term.item() == pytest.approx(-1.0, abs=1e-5)
    assert parts.local_term.item() == pytest.approx(-1.0, abs=1e-5)


def test_the_loss_is_the_weighted_mean_of_per_pair_cosines():
    pred_global = torch.randn(3, TEACHER_DIM, generator=_generator(1))
    pred_local = torch.randn(3, 16, TEACHER_DIM, generator=_generator(2))
    target_global, target_local = teacher_targets(torch.randn(3, 16, TEACHER_DIM, generator=_generator(3)))
    global_term, local_term = negative_cosine_terms(pred_global, pred_local, target_global, target_local)
    expected_global = -sum(functional.cosine_similarity(pred_global[b], target_global[b], dim=0) for b in range(3)) / 3
    expected_local = -sum(
        functional.cosine_similarity(pred_local[b, i], target_local[b, i], dim=0) for b in range(3) for i in range(16)
    ) / (3 * 16)
    torch.testing.assert_close(global_term, expected_global)
    torch.testing.assert_close(local_term, expected_local)


def test_each_cell_pairs_only_with_its_own_crop_and_sample():
    target_global, target_local = teacher_targets(torch.randn(2, 16, TEACHER_DIM, generator=_generator()))
    shuffled_cells = target_local[:, torch.randperm(16, generator=_generator(1))]
    swapped_samples = target_global.flip(0)
    global_term, local_term = negative_cosine_terms(swapped_samples, shuffled_cells, target_global, target_local)
    assert global_term.item() > -0.9
    assert local_term.item() > -0.9


def test_the_cosine_is_fp32_under_bf16():
    pred_global = torch.randn(4, TEACHER_DIM, generator=_generator(1)).bfloat16()
    pred_local = torch.randn(4, 16, TEACHER_DIM, generator=_generator(2)).bfloat16()
    target_global, target_local = teacher_targets(torch.randn(4, 16, TEACHER_DIM, generator=_generator(3)).bfloat16())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        terms = negative_cosine_terms(pred_global, pred_local, target_global, target_local)
    reference = negative_cosine_terms(pred_global.float(), pred_local.float(), target_global, target_local)
    for term, expected in zip(terms, reference, strict=True):
        assert term.dtype == torch.float32
        torch.testing.assert_close(term, expected, rtol=0, atol=1e-6)


def test_the_loss_under_bf16_autocast_is_fp32():
    heads = DistillationHeads(STUDENT_DIM, TEACHER_DIM)
    targets = teacher_targets(torch.randn(4, 16, TEACHER_DIM, generator=_generator(3)))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        parts = distillation_loss(
            torch.randn(4, STUDENT_DIM, generator=_generator(1)),
            torch.randn(4, 16, STUDENT_DIM, generator=_generator(2)),
            heads,
            *targets,
        )
    assert all(part.dtype == torch.float32 for part in parts)


def test_gradients_reach_the_student_and_both_heads_from_inference_mode_targets():
    vit = VisionTransformer(get_vit_config("tiny_dinov2"))
    heads = DistillationHeads(vit.embed_dim, TEACHER_DIM)
    with torch.inference_mode():  # as the teacher runs
        crops = torch.randn(2, 16, TEACHER_DIM, generator=_generator(1))
    features = vit.forward_features(torch.randn(2, 3, 224, 224, generator=_generator(2)))
    parts = distillation_loss(
        features["x_norm_clstoken"], pooled_cells(features["x_norm_patchtokens"]), heads, *teacher_targets(crops)
    )
    parts.total.backward()
    assert vit.patch_embed.proj.weight.grad is not None and vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert vit.cls_token.grad is not None and vit.cls_token.grad.abs().sum() > 0
    for name, parameter in heads.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_each_term_trains_only_its_own_head():
    heads = DistillationHeads(STUDENT_DIM, TEACHER_DIM)
    student_class = torch.randn(4, STUDENT_DIM, generator=_generator(1))
    student_cells = torch.randn(4, 16, STUDENT_DIM, generator=_generator(2))
    targets = teacher_targets(torch.randn(4, 16, TEACHER_DIM, generator=_generator(3)))
    distillation_loss(student_class, student_cells, heads, *targets, local_weight=0.0).total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.global_head.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in heads.local_head.parameters())


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    head = ProjectionHead(STUDENT_DIM, TEACHER_DIM)
    batch = torch.randn(8, STUDENT_DIM, generator=_generator(1)) * 3 + 2
    head.train()
    with torch.no_grad():
        head(batch)
    assert head.norm.num_batches_tracked.item() == 1
    hidden = head.fc1(batch).detach()
    momentum = head.norm.momentum
    torch.testing.assert_close(head.norm.running_mean, momentum * hidden.mean(0))
    torch.testing.assert_close(head.norm.running_var, (1 - momentum) + momentum * hidden.var(0, unbiased=True))

    head.eval()
    sample = batch[:1]
    with torch.no_grad():
        alone = head(sample)
        in_batch = head(batch)[:1]
        normed = (head.fc1(sample) - head.norm.running_mean) / torch.sqrt(head.norm.running_var + head.norm.eps)
        expected = head.fc2(functional.gelu(normed * head.norm.weight + head.norm.bias))
    # Eval: running statistics, so a sample's output does not depend on the rest of the batch.
    torch.testing.assert_close(alone, in_batch)
    torch.testing.assert_close(alone, expected)
    assert head.norm.num_batches_tracked.item() == 1

    head.train()
    with torch.no_grad():
        in_training = head(batch)[:1]
    assert not torch.allclose(in_training, alone)


def test_the_local_head_normalises_cells_with_the_batch():
    head = ProjectionHead(STUDENT_DIM, TEACHER_DIM).eval()
    cells = torch.randn(3, 16, STUDENT_DIM, generator=_generator())
    with torch.no_grad():
        torch.testing.assert_close(head(cells), head(cells.reshape(48, STUDENT_DIM)).reshape(3, 16, TEACHER_DIM))


def test_a_training_head_refuses_a_single_row():
    head = ProjectionHead(STUDENT_DIM, TEACHER_DIM).train()
    with pytest.raises(ValueError, match="at least 2 rows"):
        head(torch.zeros(1, STUDENT_DIM))
    head.eval()
    assert head(torch.zeros(1, STUDENT_DIM)).shape == (1, TEACHER_DIM)


def test_bad_inputs_are_refused():
    heads = DistillationHeads(STUDENT_DIM, TEACHER_DIM)
    student_class = torch.randn(2, STUDENT_DIM)
    student_cells = torch.randn(2, 16, STUDENT_DIM)
    targets = teacher_targets(torch.randn(2, 16, TEACHER_DIM))
    with pytest.raises(ValueError, match="in_dim must be a positive integer"):
        ProjectionHead(0, TEACHER_DIM)
    with pytest.raises(ValueError, match=rf"\(B, {STUDENT_DIM}\) or"):
        heads.global_head(torch.zeros(2, STUDENT_DIM + 1))
    with pytest.raises(ValueError, match="student class tokens"):
        distillation_loss(student_class[:, :-1], student_cells, heads, *targets)
    with pytest.raises(ValueError, match="student cells"):
        distillation_loss(student_class, student_cells[:, :15], heads, *targets)
    with pytest.raises(ValueError, match="local_weight"):
        distillation_loss(student_class, student_cells, heads, *targets, local_weight=-0.5)
    with pytest.raises(ValueError, match="global predictions"):
        negative_cosine_terms(targets[0][:1], targets[1], *targets)
    with pytest.raises(ValueError, match="local predictions"):
        negative_cosine_terms(targets[0], targets[1][:, :15], *targets)
    with pytest.raises(ValueError, match="disagree on B or Dt"):
        negative_cosine_terms(targets[0][:1], targets[1], targets[0][:1], targets[1])
