"""The optimiser's side of distillation: AdamW parameter groups, the learning-rate schedule, the EMA.

The recipe (../shared/TRAINING.md, "Optimisation"): AdamW, lr 5e-4, weight decay 0.05, 10 epochs
at a global batch of 1,152, and an exponential moving average of the backbone (decay 0.999) whose
weights are the released model. Three things here differ from the official code on purpose:

- Weight decay spares biases, norm weights, LayerScale gammas and the learned tokens, as DINOv2
  does; the official code decays every parameter.
- The schedule is a linear warm-up then a cosine down to `min_lr`, indexed by optimiser step and
  sized from the true step count. The official code replaced its cosine by a warm-up as long as
  the whole run, counted on a loader that ignored the distributed sampler (so many more batches
  than the run has): its learning rate rose for the whole run.
- The EMA is a frozen copy kept outside any module: no `requires_grad`, so it adds no gradients,
  and not inside DDP, so DDP needs no `find_unused_parameters` and all-reduces only the online
  model. The official EMA kept `requires_grad` and sat inside DDP.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from xmag.models.vit import LayerScale

# Learned tokens and position embeddings (DINOv2 calls its registers register_tokens, timm reg_token).
_TOKEN_PARAMETER_NAMES = frozenset({"cls_token", "pos_embed", "reg_token", "register_tokens", "mask_token"})
_NORM_MODULES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
# Low-precision floats cannot hold an EMA: at decay 0.999 a bf16 update of 0.1% mostly rounds away.
_EMA_DTYPES = (torch.float32, torch.float64)


def parameter_groups(
    modules: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups: one with `weight_decay`, one with none, for the trainable parameters of `modules`.

    `modules` names each module (a dict, or (name, module) pairs); parameter names are prefixed with
    it. Exempt from decay: biases, the weights of norm layers, LayerScale gammas and the learned
    tokens (cls_token, pos_embed, reg_token/register_tokens, mask_token). Decaying them pulls scales
    and offsets towards zero rather than regularising a linear map. Each group is a dict with
    `params`, `param_names` (torch keeps them in the optimiser's state dict; log them to see what went
    where), `weight_decay` and `group_name` ("decay" or "no_decay"); an empty group is left out.
    Frozen parameters are left out; a parameter reachable from two entries is a ValueError.
    """
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    entries = list(modules.items()) if isinstance(modules, Mapping) else list(modules)
    if not entries:
        raise ValueError("no modules given")
    decayed: list[tuple[str, nn.Parameter]] = []
    exempt: list[tuple[str, nn.Parameter]] = []
    owner_of: dict[int, str] = {}  # parameter identity -> the entry that supplied it
    names = [entry_name for entry_name, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"module names must be unique, got {names}")
    for entry_name, module in entries:
        if not isinstance(entry_name, str) or not entry_name:
            raise ValueError(f"every module needs a non-empty string name, got {entry_name!r}")
        if not isinstance(module, nn.Module):
            raise ValueError(f"{entry_name!r} is a {type(module).__name__}, not an nn.Module")
        for name, parameter, is_exempt in _classified_parameters(module):
            owner = owner_of.setdefault(id(parameter), entry_name)
            if owner != entry_name:
                raise ValueError(
                    f"parameter {entry_name}.{name} is also in {owner!r}: "
                    "pass each module once, not a module and a part of it"
                )
            if not parameter.requires_grad:
                continue
            (exempt if is_exempt else decayed).append((f"{entry_name}.{name}", parameter))
    if not decayed and not exempt:
        raise ValueError(f"the modules {names} have no trainable parameter")
    groups = []
    for group_name, members, decay in (("decay", decayed, weight_decay), ("no_decay", exempt, 0.0)):
        if members:
            groups.append(
                {
                    "params": [parameter for _, parameter in members],
                    "param_names": [name for name, _ in members],
                    "weight_decay": decay,
                    "group_name": group_name,
                }
            )
    return groups


def _classified_parameters(module: nn.Module) -> Iterable[tuple[str, nn.Parameter, bool]]:
    # Walk modules rather than parameters: whether a weight is exempt depends on the layer that owns it.
    seen: set[int] = set()
    for module_name, submodule in module.named_modules():
        owner_is_exempt = isinstance(submodule, (*_NORM_MODULES, LayerScale))
        for local_name, parameter in submodule.named_parameters(recurse=False):
            if id(parameter) in seen:  # a tied weight counts once, under its first name
                continue
            seen.add(id(parameter))
            name = f"{module_name}.{local_name}" if module_name else local_name
            yield name, parameter, owner_is_exempt or local_name == "bias" or local_name in _TOKEN_PARAMETER_NAMES


class WarmupCosineSchedule:
    """Linear warm-up to `base_lr`, then a half cosine down to exactly `min_lr` at the last step.

    Steps are 0-based optimiser steps, 0 .. total_steps - 1. Warm-up step s (s < warmup_steps) has
    base_lr * (s + 1) / warmup_steps: it starts at base_lr / warmup_steps, not at 0 (a step at lr 0 is
    a step lost), and reaches base_lr at step warmup_steps - 1, the peak. From the peak the cosine
    runs to step total_steps - 1, where it gives min_lr exactly. Without warm-up the peak is step 0.
    """

    def __init__(self, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
        if not (base_lr > 0.0 and math.isfinite(base_lr)):
            raise ValueError(f"base_lr must be a finite number > 0, got {base_lr}")
        if not (0.0 <= min_lr <= base_lr):
            raise ValueError(f"min_lr must lie in [0, base_lr = {base_lr}], got {min_lr}")
        _check_count("total_steps", total_steps, minimum=2)
        _check_count("warmup_steps", warmup_steps, minimum=0)
        if warmup_steps >= total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps}): "
                "a warm-up as long as the run never reaches its peak"
            )
        self.base_lr = base_lr
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    @property
    def peak_step(self) -> int:
        """The step at base_lr: the last warm-up step, or step 0 without warm-up."""
        return max(self.warmup_steps - 1, 0)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step `step` (0-based); a step outside the run is a ValueError."""
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.total_steps:
            raise ValueError(f"step must be an integer in [0, {self.total_steps - 1}], got {step!r}")
        if step < self.peak_step:
            return self.base_lr * ((step + 1) / self.warmup_steps)
        progress = (step - self.peak_step) / (self.total_steps - 1 - self.peak_step)  # 0 at the peak, 1 at the end
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimiser: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr to lr_at(step) times its `lr_scale` (1 when absent); return lr_at(step)."""
        lr = self.lr_at(step)
        for group in optimiser.param_groups:
            scale = group.get("lr_scale", 1.0)
            if not (scale > 0.0 and math.isfinite(scale)):
                raise ValueError(f"a parameter group's lr_scale must be a finite number > 0, got {scale}")
            group["lr"] = lr * scale
        return lr


def total_steps_of(dataset_size: int, global_batch: int, epochs: int, drop_last: bool = True) -> int:
    """Optimiser steps of a run: epochs x batches of `global_batch` samples (all ranks together) per epoch.

    With drop_last an incomplete last batch is dropped (floor), otherwise it is a step (ceil). Under
    DDP this is the count when the sampler and the loader agree: DistributedSampler(drop_last=True)
    with DataLoader(drop_last=True) gives floor(dataset_size / global_batch) steps per epoch, and both
    without drop_last give the ceiling. Count on the sampler's loader, never on one over the whole
    dataset at the per-rank batch: that is world_size times too many.
    """
    _check_count("dataset_size", dataset_size, minimum=1)
    _check_count("global_batch", global_batch, minimum=1)
    _check_count("epochs", epochs, minimum=1)
    per_epoch = dataset_size // global_batch if drop_last else -(-dataset_size // global_batch)
    if per_epoch == 0:
        raise ValueError(f"{dataset_size} samples make no full batch of {global_batch} with drop_last")
    return per_epoch * epochs


class ExponentialMovingAverage:
    """A frozen copy of a model that follows it as ema = decay * ema + (1 - decay) * online.

    A plain object, not an nn.Module: assigned to a module's attribute it is not registered, so it
    stays out of DDP, `.parameters()` and the online state dict. Its copy (`module`) is in eval mode
    with `requires_grad` off. Call `update(model)` after every optimiser step with the unwrapped
    online model (not the DDP wrapper). Its floating-point parameters must be fp32 or fp64 (AMP keeps
    fp32 master weights; a bf16 EMA at decay 0.999 would round most updates away).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        _check_unwrapped(model)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        low_precision = [
            name for name, p in model.named_parameters() if p.is_floating_point() and p.dtype not in _EMA_DTYPES
        ]
        if low_precision:
            raise ValueError(f"EMA parameters must be fp32 or fp64; {low_precision[:3]} are not")
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None  # deepcopy copies any gradient the online model held

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards `model`'s current weights; copy its buffers as they are.

        Buffers are copied, not averaged: they are not trained by the optimiser, and those that
        change (BatchNorm's running statistics, its integer batch counter) are already running
        values or counts of the online model. The ViT backbone has none, but a module with them
        stays correct.
        """
        _check_unwrapped(model)
        online_parameters = dict(model.named_parameters())
        online_buffers = dict(model.named_buffers())
        ema_parameters = dict(self.module.named_parameters())
        ema_buffers = dict(self.module.named_buffers())
        if online_parameters.keys() != ema_parameters.keys() or online_buffers.keys() != ema_buffers.keys():
            raise ValueError("the model passed to update() is not the one the EMA was made from: names differ")
        for name, ema_parameter in ema_parameters.items():
            online = online_parameters[name]
            if online.shape != ema_parameter.shape:
                raise ValueError(
                    f"{name}: online shape {tuple(online.shape)} != EMA shape {tuple(ema_parameter.shape)}"
                )
            if ema_parameter.is_floating_point():
                ema_parameter.mul_(self.decay).add_(online, alpha=1.0 - self.decay)
            else:
                ema_parameter.copy_(online)
        for name, ema_buffer in ema_buffers.items():
            ema_buffer.copy_(online_buffers[name])
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (`module`), `decay` and `num_updates`, for a checkpoint."""
        return {"module": self.module.state_dict(), "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` saved; a checkpoint of another decay is a ValueError."""
        missing = {"module", "decay", "num_updates"} - set(state)
        if missing:
            raise ValueError(f"not an EMA state dict: missing {sorted(missing)}")
        if state["decay"] != self.decay:
            raise ValueError(f"the checkpoint's EMA decay is {state['decay']}, this run's is {self.decay}")
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])


def _check_unwrapped(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ValueError(f"pass the wrapped model ({type(model).__name__}.module), not the wrapper")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
