"""Optimisation for distillation: AdamW groups (DINOv2's decay exemptions, every parameter once), the
warm-up + cosine schedule's shape and the paper's step count, and the EMA against a hand-computed average."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from xmag.models.vit import VisionTransformer, get_vit_config
from xmag.training.distill_objective import DistillationHeads
from xmag.training.optimisation import (
    ExponentialMovingAverage,
    WarmupCosineSchedule,
    parameter_groups,
    total_steps_of,
)

# The paper: 3.49M regions, global batch 1,152 (48 per GPU x 24 GPUs), 10 epochs, 30,260 iterations.
PAPER_REGIONS = 3_486_720
PAPER_GLOBAL_BATCH = 1_152
PAPER_PER_GPU_BATCH = 48
PAPER_EPOCHS = 10
PAPER_ITERATIONS = 30_260


def _student_and_heads(config_name: str) -> dict[str, nn.Module]:
    vit = VisionTransformer(get_vit_config(config_name))
    return {"backbone": vit, "heads": DistillationHeads(vit.embed_dim, get_vit_config("tiny_uni2h").embed_dim)}


def _expected_decayed_names(depth: int) -> set[str]:
    # Written out by hand: the weight matrices and convolution kernels, nothing else.
    names = {"backbone.patch_embed.proj.weight"}
    for block in range(depth):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            names.add(f"backbone.blocks.{block}.{layer}.weight")
    for head in ("global_head", "local_head"):
        names |= {f"heads.{head}.fc1.weight", f"heads.{head}.fc2.weight"}
    return names


@pytest.mark.parametrize("config_name", ["tiny_dinov2", "tiny_uni2h"])
def test_groups_exempt_biases_norms_layerscale_and_tokens(config_name):
    modules = _student_and_heads(config_name)
    groups = parameter_groups(modules, weight_decay=0.05)
    by_name = {group["group_name"]: group for group in groups}
    assert set(by_name) == {"decay", "no_decay"}
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["no_decay"]["weight_decay"] == 0.0

    all_names = {f"{prefix}.{name}" for prefix, module in modules.items() for name, _ in module.named_parameters()}
    decayed = set(by_name["decay"]["param_names"])
    exempt = set(by_name["no_decay"]["param_names"])
    assert decayed == _expected_decayed_names(get_vit_config(config_name).depth)
    assert exempt == all_names - decayed
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.norm.weight"} <= exempt
    assert {"backbone.blocks.0.ls1.gamma", "backbone.blocks.1.norm2.weight", "heads.local_head.norm.weight"} <= exempt
    if config_name == "tiny_uni2h":
        assert "backbone.reg_token" in exempt
    print(f"\n{config_name}: {len(decayed)} decayed, {len(exempt)} exempt: {sorted(exempt)[:6]} ...")


def test_every_trainable_parameter_is_in_exactly_one_group():
    modules = _student_and_heads("tiny_dinov2")
    groups = parameter_groups(modules, weight_decay=0.05)
    grouped = [id(parameter) for group in groups for parameter in group["params"]]
    trainable = [id(p) for module in modules.values() for p in module.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) == len(trainable)
    assert set(grouped) == set(trainable)
    for group in groups:
        assert len(group["params"]) == len(group["param_names"])
    # AdamW takes them as they are and keeps the names in its state dict, for the logs.
    optimiser = torch.optim.AdamW(groups, lr=5e-4)
    saved = optimiser.state_dict()["param_groups"]
    assert [group["param_names"] for group in saved] == [group["param_names"] for group in groups]


def test_frozen_parameters_are_left_out_and_pairs_work_like_a_dict():
    modules = _student_and_heads("tiny_dinov2")
    modules["backbone"].patch_embed.requires_grad_(False)
    from_dict = parameter_groups(modules, weight_decay=0.05)
    from_pairs = parameter_groups(list(modules.items()), weight_decay=0.05)
    assert [g["param_names"] for g in from_dict] == [g["param_names"] for g in from_pairs]
    names = {name for group in from_dict for name in group["param_names"]}
    assert not any(name.startswith("backbone.patch_embed.") for name in names)


def test_a_tied_weight_counts_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    groups = parameter_groups({"model": model}, weight_decay=0.1)
    assert [g["param_names"] for g in groups] == [["model.0.weight"], ["model.0.bias"]]


def test_bad_group_arguments_are_refused():
    modules = _student_and_heads("tiny_dinov2")
    with pytest.raises(ValueError, match="weight_decay"):
        parameter_groups(modules, weight_decay=-0.05)
    with pytest.raises(ValueError, match="weight_decay"):
        parameter_groups(modules, weight_decay=math.nan)
    with pytest.raises(ValueError, match="unique"):
        parameter_groups([("backbone", modules["backbone"]), ("backbone", modules["heads"])], weight_decay=0.05)
    with pytest.raises(ValueError, match="no modules"):
        parameter_groups({}, weight_decay=0.05)
    with pytest.raises(ValueError, match="pass each module once"):
        parameter_groups({"student": modules["backbone"], "blocks": modules["backbone"].blocks}, weight_decay=0.05)
    with pytest.raises(ValueError, match=r"not an nn\.Module"):
        parameter_groups({"backbone": "vit"}, weight_decay=0.05)
    with pytest.raises(ValueError, match="no trainable parameter"):
        parameter_groups({"backbone": modules["backbone"].requires_grad_(False)}, weight_decay=0.05)


def test_the_schedule_warms_up_peaks_and_decays_to_exactly_min_lr():
    base_lr, min_lr = 5e-4, 1e-6
    schedule = WarmupCosineSchedule(base_lr, min_lr, warmup_steps=10, total_steps=110)
    lrs = [schedule.lr_at(step) for step in range(110)]
    warmup, cosine = lrs[: schedule.peak_step + 1], lrs[schedule.peak_step :]
    assert schedule.peak_step == 9
    assert lrs[0] == pytest.approx(base_lr / 10)
    assert all(later > earlier for earlier, later in itertools.pairwise(warmup))
    assert lrs[9] == base_lr == max(lrs)
    assert all(later < earlier for earlier, later in itertools.pairwise(cosine))
    assert lrs[-1] == min_lr  # exactly
    # The cosine runs from the peak (step 9) to the last step (109): its midpoint is step 59.
    assert lrs[59] == pytest.approx((base_lr + min_lr) / 2, rel=1e-12)
    print(
        f"\nlr: step 0 {lrs[0]:.3g}, peak (step 9) {lrs[9]:.3g}, midpoint (step 59) {lrs[59]:.6g}, last {lrs[-1]:.3g}"
    )


def test_the_schedule_without_warmup_starts_at_the_peak():
    schedule = WarmupCosineSchedule(1.0, 0.0, warmup_steps=0, total_steps=3)
    assert [schedule.lr_at(step) for step in range(3)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-15)


def test_the_schedule_sets_every_group_with_its_lr_scale():
    schedule = WarmupCosineSchedule(1e-3, 0.0, warmup_steps=4, total_steps=20)
    layer = nn.Linear(3, 3)
    optimiser = torch.optim.AdamW([{"params": [layer.weight]}, {"params": [layer.bias], "lr_scale": 0.1}], lr=123.0)
    lr = schedule.apply(optimiser, 3)
    assert lr == 1e-3
    assert [group["lr"] for group in optimiser.param_groups] == pytest.approx([1e-3, 1e-4])
    optimiser.param_groups[1]["lr_scale"] = 0.0
    with pytest.raises(ValueError, match="lr_scale"):
        schedule.apply(optimiser, 3)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((0.0, 0.0, 1, 10), "base_lr"),
        ((1e-3, 2e-3, 1, 10), "min_lr"),
        ((1e-3, 0.0, 10, 10), "smaller than total_steps"),
        ((1e-3, 0.0, -1, 10), "warmup_steps"),
        ((1e-3, 0.0, 0, 1), "total_steps"),
        ((1e-3, 0.0, 1.5, 10), "warmup_steps"),
    ],
)
def test_bad_schedules_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        WarmupCosineSchedule(*arguments)


@pytest.mark.parametrize("step", [-1, 20, 2.0, True])
def test_a_step_outside_the_run_is_refused(step):
    schedule = WarmupCosineSchedule(1e-3, 0.0, warmup_steps=2, total_steps=20)
    with pytest.raises(ValueError, match=r"\[0, 19\]"):
        schedule.lr_at(step)


def test_the_paper_step_count():
    total = total_steps_of(PAPER_REGIONS, PAPER_GLOBAL_BATCH, PAPER_EPOCHS)
    per_epoch = PAPER_REGIONS // PAPER_GLOBAL_BATCH
    assert total == PAPER_EPOCHS * per_epoch
    assert total_steps_of(PAPER_REGIONS, PAPER_GLOBAL_BATCH, PAPER_EPOCHS, drop_last=False) == PAPER_EPOCHS * (
        per_epoch + 1
    )
    # Every dataset size that gives the paper's 30,260 iterations rounds to its 3.49M regions.
    smallest, largest = 3_026 * PAPER_GLOBAL_BATCH, 3_027 * PAPER_GLOBAL_BATCH - 1
    assert total_steps_of(smallest, PAPER_GLOBAL_BATCH, PAPER_EPOCHS) == PAPER_ITERATIONS
    assert total_steps_of(largest, PAPER_GLOBAL_BATCH, PAPER_EPOCHS) == PAPER_ITERATIONS
    assert total_steps_of(smallest - 1, PAPER_GLOBAL_BATCH, PAPER_EPOCHS) < PAPER_ITERATIONS
    assert round(smallest / 1e6, 2) == round(largest / 1e6, 2) == 3.49
    assert total == PAPER_ITERATIONS
    print(
        f"\n{PAPER_REGIONS:,} regions // {PAPER_GLOBAL_BATCH:,} = {per_epoch:,} steps/epoch x {PAPER_EPOCHS} = "
        f"{total:,} steps (drop_last); sizes {smallest:,}..{largest:,} all give {PAPER_ITERATIONS:,}"
    )


def test_a_warmup_counted_on_one_ranks_batch_outlasts_the_run():
    # The official trap: ten epochs of warm-up counted on a loader at the per-GPU batch over all regions.
    run = total_steps_of(PAPER_REGIONS, PAPER_GLOBAL_BATCH, PAPER_EPOCHS)
    miscounted_warmup = total_steps_of(PAPER_REGIONS, PAPER_PER_GPU_BATCH, PAPER_EPOCHS)
    reached = run / miscounted_warmup  # the fraction of the peak a linear warm-up reaches by the last step
    assert miscounted_warmup > 24 * run - 1 and reached < 0.05
    print(
        f"\nmiscounted warm-up {miscounted_warmup:,} steps for a {run:,}-step run: the lr ends at {reached:.1%} of base"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((0, 8, 1), "dataset_size"),
        ((10, 0, 1), "global_batch"),
        ((10, 8, 0), "epochs"),
        ((7, 8, 1), "no full batch"),
    ],
)
def test_bad_step_counts_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        total_steps_of(*arguments)


def _small_model() -> nn.Module:
    # BatchNorm gives the model buffers (running statistics, an integer counter) to check the EMA copies.
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 2))


def test_the_ema_matches_a_hand_computed_average():
    torch.manual_seed(0)
    model = _small_model()
    decay = 0.9
    ema = ExponentialMovingAverage(model, decay=decay)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    reference = dict(initial)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(7):
        optimiser.zero_grad()
        model(torch.randn(16, 4)).square().mean().backward()
        optimiser.step()
        ema.update(model)
        for name, online in model.named_parameters():
            reference[name] = decay * reference[name] + (1 - decay) * online.detach()
    assert ema.num_updates == 7
    for name, averaged in ema.module.named_parameters():
        torch.testing.assert_close(averaged, reference[name], rtol=0, atol=1e-6)
        online = dict(model.named_parameters())[name]
        # The first bias gets no gradient (the BatchNorm after it removes it): only moved weights can differ.
        if not torch.equal(online, initial[name]):
            assert not torch.allclose(averaged, online), name
    assert not torch.allclose(ema.module[3].weight, model[3].weight)
    for name, buffer in ema.module.named_buffers():
        assert torch.equal(buffer, dict(model.named_buffers())[name]), name


def test_the_ema_is_frozen_unregistered_and_separate():
    model = _small_model()
    model(torch.randn(4, 4)).sum().backward()  # the online model holds gradients when the copy is made
    ema = ExponentialMovingAverage(model)
    assert not ema.module.training
    assert all(not p.requires_grad and p.grad is None for p in ema.module.parameters())
    owner = nn.Module()
    owner.student = model
    owner.ema = ema
    assert {name.split(".")[0] for name, _ in owner.named_parameters()} == {"student"}
    online_storage = {p.data_ptr() for p in model.parameters()}
    assert not online_storage & {p.data_ptr() for p in ema.module.parameters()}
    # Training the online model further leaves the average alone until update().
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.parameters(), strict=True))


def test_the_ema_survives_a_state_dict_round_trip():
    torch.manual_seed(1)
    model = _small_model()
    ema = ExponentialMovingAverage(model, decay=0.99)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    ema.update(model)
    restored = ExponentialMovingAverage(_small_model(), decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1
    for (name, a), b in zip(ema.module.state_dict().items(), restored.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="decay"):
        ExponentialMovingAverage(_small_model(), decay=0.999).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"module": {}})


def test_bad_ema_arguments_are_refused():
    model = _small_model()
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            ExponentialMovingAverage(model, decay=decay)
    with pytest.raises(ValueError, match="wrapped model"):
        ExponentialMovingAverage(nn.DataParallel(model))
    with pytest.raises(ValueError, match="fp32 or fp64"):
        ExponentialMovingAverage(_small_model().bfloat16())
    with pytest.raises(ValueError, match="names differ"):
        ExponentialMovingAverage(model).update(nn.Linear(4, 8))
