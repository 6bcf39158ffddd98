"""Slide-level heads: gated-attention multiple-instance learning (ABMIL).

A slide is a bag of N tile embeddings. ABMIL (Ilse et al. 2018, gated
variant, as in CLAM) scores every tile, turns the scores into attention
weights with a softmax over the tiles, pools the tiles with those weights and
classifies the pooled vector:

    h_i    = Dropout(ReLU(W_in x_i))                      (N, hidden)
    s_i    = w^T (tanh(V h_i) * sigmoid(U h_i))           (N,)
    a      = softmax(s) over the N tiles                  (N,), sums to 1
    pooled = sum_i a_i h_i                                (hidden,)
    logits = classifier(pooled)                           (num_classes,)

The attention weights double as the heatmap shown to pathologists.
`SlideHeads` runs several such heads on one set of tile features, so a slide
is encoded once whatever the number of tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class GatedABMIL(nn.Module):
    """Gated-attention MIL head: (N, in_dim) tile features -> (logits, attention)."""

    def __init__(
        self,
        in_dim: int = 768,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        num_classes: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.attention_dim = attention_dim
        self.num_classes = num_classes
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_tanh = nn.Linear(hidden_dim, attention_dim)  # V
        self.attention_gate = nn.Linear(hidden_dim, attention_dim)  # U
        # w; a bias here would shift every score equally and cancel in the softmax.
        self.attention_score = nn.Linear(attention_dim, 1, bias=False)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (num_classes,) and attention weights (N,) for one slide's tiles (N, in_dim)."""
        _check_features(features, self.in_dim)
        hidden = self.embed(features)
        gated = torch.tanh(self.attention_tanh(hidden)) * torch.sigmoid(self.attention_gate(hidden))
        scores = self.attention_score(gated).squeeze(-1)
        attention = torch.softmax(scores, dim=0)
        pooled = attention @ hidden
        return self.classifier(pooled), attention

    def forward_padded(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` on a batch of bags padded to one length, for training several bags per step.

        features (B, N, in_dim), mask (B, N) bool, True on real tiles; returns
        logits (B, num_classes) and attention (B, N), zero on padding, each row
        equal to `forward` on that bag's real tiles alone.
        """
        if features.ndim != 3 or features.shape[2] != self.in_dim or mask.shape != features.shape[:2]:
            raise ValueError(
                f"expected features (B, N, {self.in_dim}) and a mask (B, N), got {tuple(features.shape)} "
                f"and {tuple(mask.shape)}"
            )
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every bag in the batch needs at least one tile")
        hidden = self.embed(features)
        gated = torch.tanh(self.attention_tanh(hidden)) * torch.sigmoid(self.attention_gate(hidden))
        scores = self.attention_score(gated).squeeze(-1).masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bn,bnh->bh", attention, hidden)
        return self.classifier(pooled), attention


class SlideHeads(nn.Module):
    """Several slide tasks sharing one set of tile features.

    `heads` maps a task name to its GatedABMIL; `class_names` maps the same
    task names to the names of that head's classes, in logit order.
    """

    def __init__(self, heads: Mapping[str, GatedABMIL], class_names: Mapping[str, Sequence[str]]):
        super().__init__()
        if not heads:
            raise ValueError("SlideHeads needs at least one head")
        if set(heads) != set(class_names):
            raise ValueError(
                f"heads and class_names must name the same tasks; heads: {sorted(heads)}, "
                f"class_names: {sorted(class_names)}"
            )
        in_dims = {task: head.in_dim for task, head in heads.items()}
        if len(set(in_dims.values())) != 1:
            raise ValueError(f"all heads must take the same feature width; got {in_dims}")
        for task, head in heads.items():
            if "." in task or not task:
                raise ValueError(f"task names must be non-empty and contain no '.', got {task!r}")
            names = list(class_names[task])
            if len(names) != head.num_classes:
                raise ValueError(
                    f"task {task!r}: {len(names)} class names {names} for a head with {head.num_classes} classes"
                )
            if len(set(names)) != len(names):
                raise ValueError(f"task {task!r}: class names must be unique, got {names}")
        self.heads = nn.ModuleDict(heads)
        self.class_names = {task: list(names) for task, names in class_names.items()}
        self.in_dim = next(iter(in_dims.values()))

    @classmethod
    def from_class_names(cls, class_names: Mapping[str, Sequence[str]], **head_kwargs) -> SlideHeads:
        """One new GatedABMIL per task, sized by its class names; `head_kwargs` go to every head."""
        heads = {task: GatedABMIL(num_classes=len(names), **head_kwargs) for task, names in class_names.items()}
        return cls(heads, class_names)

    def forward(self, features: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{task: (logits, attention)} for one slide's tile features (N, in_dim)."""
        _check_features(features, self.in_dim)
        return {task: head(features) for task, head in self.heads.items()}


def _check_features(features: torch.Tensor, in_dim: int) -> None:
    if features.ndim != 2 or features.shape[1] != in_dim:
        raise ValueError(f"expected tile features of shape (N, {in_dim}), got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError("the bag is empty: a slide needs at least one tile to classify")
