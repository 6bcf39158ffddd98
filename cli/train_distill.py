"""`xmag train distill`: the 5x student distilled from the 20x teacher on pairs; see training/distill.py."""

from __future__ import annotations

from pathlib import Path

import typer

from xmag.cli.app import progress_bar
from xmag.cli.train import train_app


@train_app.command("distill")
def distill(
    pairs_dir: Path = typer.Option(..., "--pairs", help="Training pairs written by `xmag train pairs`."),
    val_pairs_dir: Path = typer.Option(..., "--val-pairs", help="Held-out pairs (other slides) for validation."),
    output_dir: Path = typer.Option(..., "--out", help="The run folder: config, log.jsonl, checkpoints, release."),
    teacher_config: str = typer.Option("uni2h", help="The teacher's architecture (a ViT config name)."),
    teacher_weights: Path | None = typer.Option(None, help="The teacher's weights (random without: tests only)."),
    teacher_format: str = typer.Option("auto", help="Format of --teacher-weights: auto, xmag, timm, dinov2, ..."),
    student_config: str = typer.Option("xmag_vitb14", help="The student's architecture (a ViT config name)."),
    student_weights: Path | None = typer.Option(None, help="The student's initial weights (seeded random without)."),
    student_format: str = typer.Option("auto", help="Format of --student-weights."),
    epochs: int = typer.Option(10, help="Passes over the pairs."),
    batch_size: int = typer.Option(48, help="Regions per process per micro-batch."),
    accumulation: int = typer.Option(1, help="Micro-batches per optimiser step."),
    lr: float = typer.Option(5e-4, help="AdamW's peak learning rate."),
    min_lr: float = typer.Option(1e-6, help="The learning rate at the last step of the cosine."),
    warmup_steps: int = typer.Option(0, help="Steps of linear warm-up."),
    weight_decay: float = typer.Option(0.05, help="AdamW's weight decay (not on biases, norms, LayerScale, tokens)."),
    ema_decay: float = typer.Option(0.999, help="Decay of the EMA whose weights are released."),
    checkpoint_every: int = typer.Option(500, help="Steps between checkpoints (one is also written at the end)."),
    keep_last: int = typer.Option(3, help="Checkpoints kept."),
    validate_every: int | None = typer.Option(None, help="Steps between validations (always at start and end)."),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint in --out."),
    seed: int = typer.Option(0, help="Seed of the data order, the augmentation and the initialisation."),
    max_steps: int | None = typer.Option(None, help="Stop after this many steps (checkpointed; --resume goes on)."),
    workers: int = typer.Option(0, help="DataLoader processes reading and augmenting pairs."),
) -> None:
    """Distil the teacher's 20x embeddings into the 5x student; release the EMA student as student.safetensors."""
    from xmag.training.distill import DistillConfig, train_distillation

    config = DistillConfig(
        teacher_config=teacher_config,
        teacher_weights=None if teacher_weights is None else str(teacher_weights),
        teacher_format=teacher_format,
        student_config=student_config,
        student_weights=None if student_weights is None else str(student_weights),
        student_format=student_format,
        epochs=epochs,
        batch_size=batch_size,
        accumulation=accumulation,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        ema_decay=ema_decay,
        checkpoint_every=checkpoint_every,
        keep_last=keep_last,
        validate_every=validate_every,
        seed=seed,
        max_steps=max_steps,
        workers=workers,
    )
    with progress_bar("step", "distill") as bar:

        def logged(entry: dict) -> None:
            if entry["kind"] == "validation":
                typer.echo(
                    f"step {entry['step']}: held-out global cosine {entry['global_cosine']:.4f}, "
                    f"local cosine {entry['local_cosine']:.4f}"
                )
                return
            if not bar.total:
                bar.reset(total=entry["total_steps"])
                bar.update(entry["step"] - 1)  # a resumed run starts where its checkpoint left off
            bar.set_postfix_str(f"loss {entry['loss']:.4f}, {entry['regions_per_s']:.1f} regions/s")
            bar.update(1)

        result = train_distillation(pairs_dir, val_pairs_dir, output_dir, config, resume=resume, on_step=logged)
    if result.release is None:
        typer.echo(f"stopped after step {result.steps} of {result.total_steps}; continue with --resume")
    else:
        typer.echo(f"wrote {result.release}: the EMA student after {result.steps} steps")
