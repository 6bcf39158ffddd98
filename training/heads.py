"""Training one gated-ABMIL slide head on frozen tile features: the recipe.

    for each epoch (at most max_epochs):
        shuffle the training bags (a new order and new tile subsets every epoch)
        for each batch of bags_per_batch bags:
            cap each bag at max_tiles_per_bag random tiles; pad to one length; mask the padding
            class-weighted cross-entropy (weights inverse to the class counts), AdamW step,
            cosine learning-rate schedule stepped per batch
        validation loss and AUC on whole bags, in eval mode
        keep the weights of the best validation loss; stop after `patience` epochs without one

Class weighting is in the loss, not in sampling: every bag is seen once per
epoch. Validation and prediction use whole bags (no cap): the tile cap bounds
training memory and time and adds variety; it is not part of the model.
Deterministic on the CPU for a seed: the global RNG (dropout, initialisation)
is forked and seeded, and every epoch draws from its own seeded generator,
so epochs do not repeat one subset (re-seeding one sampler with the same
seed every epoch would).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional

from xmag.models.abmil import GatedABMIL
from xmag.training.config import HeadsConfig
from xmag.training.statistics import classification_metrics


@dataclass(frozen=True)
class EpochLog:
    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val_auc: float  # NaN when the validation part holds one class only
    learning_rate: float  # at the end of the epoch


@dataclass
class TrainedHead:
    head: GatedABMIL  # the weights of the best validation loss, in eval mode
    best_epoch: int
    history: list[EpochLog] = field(default_factory=list)
    stopped_early: bool = False


def train_head(
    train_bags: list[np.ndarray],
    train_labels: np.ndarray,
    val_bags: list[np.ndarray],
    val_labels: np.ndarray,
    num_classes: int,
    config: HeadsConfig = HeadsConfig(),
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> TrainedHead:
    """Train a GatedABMIL on bags of tile features (N_i, D) with class indices; early-stopped on the validation bags."""
    train_labels, val_labels = np.asarray(train_labels, dtype=np.int64), np.asarray(val_labels, dtype=np.int64)
    _check_part("training", train_bags, train_labels, num_classes)
    _check_part("validation", val_bags, val_labels, num_classes)
    counts = np.bincount(train_labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"the training part has no slide of classes {np.flatnonzero(counts == 0).tolist()}")
    class_weights = torch.tensor(len(train_labels) / (num_classes * counts), dtype=torch.float32)

    threads = torch.get_num_threads()
    # A head is small: one thread trains it as fast as two, and never fights other work for the cores.
    torch.set_num_threads(1)
    try:
        return _train(train_bags, train_labels, val_bags, val_labels, num_classes, class_weights, config, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _train(train_bags, train_labels, val_bags, val_labels, num_classes, class_weights, config, on_epoch) -> TrainedHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = GatedABMIL(
            in_dim=train_bags[0].shape[1],
            hidden_dim=config.hidden_dim,
            attention_dim=config.attention_dim,
            num_classes=num_classes,
            dropout=config.dropout,
        )
        optimiser = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(train_bags) / config.bags_per_batch)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.max_epochs * steps_per_epoch)
        trained = TrainedHead(head=head, best_epoch=0)
        best_loss, best_state = math.inf, copy.deepcopy(head.state_dict())
        for epoch in range(1, config.max_epochs + 1):
            rng = np.random.default_rng([config.seed, epoch])
            head.train()
            losses = []
            for batch in _batches(rng.permutation(len(train_bags)), config.bags_per_batch):
                features, mask = _padded([_capped(train_bags[i], config.max_tiles_per_bag, rng) for i in batch])
                logits, _ = head.forward_padded(features, mask)
                loss = functional.cross_entropy(logits, torch.from_numpy(train_labels[batch]), weight=class_weights)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(loss.item() * len(batch))
            val_probabilities = predict_bags(head, val_bags)
            val_loss = mean_log_loss(val_probabilities, val_labels)
            log = EpochLog(
                epoch=epoch,
                train_loss=sum(losses) / len(train_bags),
                val_loss=val_loss,
                val_auc=classification_metrics(val_labels, val_probabilities)["auc"],
                learning_rate=schedule.get_last_lr()[0],
            )
            trained.history.append(log)
            if on_epoch is not None:
                on_epoch(log)
            if val_loss < best_loss:
                best_loss, best_state, trained.best_epoch = val_loss, copy.deepcopy(head.state_dict()), epoch
            elif epoch - trained.best_epoch >= config.patience:
                trained.stopped_early = True
                break
    head.load_state_dict(best_state)
    head.eval()
    return trained


@torch.no_grad()
def predict_bags(head: GatedABMIL, bags: list[np.ndarray]) -> np.ndarray:
    """Class probabilities (n, C) of whole bags, one bag at a time, in eval mode (the mode is restored after)."""
    was_training = head.training
    head.eval()
    try:
        rows = [torch.softmax(head(torch.from_numpy(bag))[0], dim=0).numpy() for bag in bags]
    finally:
        head.train(was_training)
    return np.stack(rows).astype(np.float64)


def _check_part(name: str, bags: list[np.ndarray], labels: np.ndarray, num_classes: int) -> None:
    if not bags:
        raise ValueError(f"the {name} part has no slides")
    if len(bags) != len(labels):
        raise ValueError(f"{len(bags)} {name} bags but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{name} labels must be class indices 0..{num_classes - 1}")
    if any(bag.ndim != 2 or len(bag) == 0 for bag in bags):
        raise ValueError(f"every {name} bag must be a non-empty (tiles, features) array")


def _batches(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[start : start + size] for start in range(0, len(order), size)]


def _capped(bag: np.ndarray, max_tiles: int, rng: np.random.Generator) -> np.ndarray:
    if len(bag) <= max_tiles:
        return bag
    return bag[np.sort(rng.choice(len(bag), size=max_tiles, replace=False))]


def _padded(bags: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(bag) for bag in bags)
    features = torch.zeros(len(bags), longest, bags[0].shape[1])
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for row, bag in enumerate(bags):
        features[row, : len(bag)] = torch.from_numpy(bag)
        mask[row, : len(bag)] = True
    return features, mask


def mean_log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The validation loss early stopping watches: mean cross-entropy of predicted probabilities (n, C)."""
    chosen = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(chosen, 1e-12, 1.0))))
