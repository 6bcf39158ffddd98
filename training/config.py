"""The hyperparameters of the slide heads' recipe, apart from the code that runs it (the command line reads the
defaults without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadsConfig:
    """The hyperparameters of `train_head` (defaults between CLAM's and TRIDENT's tutorial; see docs/training.md)."""

    max_epochs: int = 50
    patience: int = 10  # epochs without a lower validation loss before stopping
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4  # AdamW's decoupled weight decay
    dropout: float = 0.25
    hidden_dim: int = 256
    attention_dim: int = 128
    bags_per_batch: int = 4
    max_tiles_per_bag: int = 512  # in training only; validation and prediction see whole bags
    seed: int = 0

    def __post_init__(self):
        for name in ("max_epochs", "patience", "hidden_dim", "attention_dim", "bags_per_batch", "max_tiles_per_bag"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or self.weight_decay < 0 or not 0 <= self.dropout < 1:
            raise ValueError("learning_rate must be positive, weight_decay non-negative and dropout in [0, 1)")
