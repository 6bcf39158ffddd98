"""Training commands: `xmag train heads | compare | e2e | probe`, one subcommand per recipe.

Each only parses its arguments and calls `xmag.training`; the group is
registered on the root command here, its subcommands in the modules beside it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from xmag.cli.app import app, progress_bar
from xmag.training.config import HeadsConfig

train_app = typer.Typer(
    name="train",
    help="Train slide heads (ABMIL), e2e-XMAG, linear probes; cut distillation pairs; compare two models' predictions.",
    no_args_is_help=True,
)
app.add_typer(train_app)


def _class_order(values: list[str]) -> dict[str, list[str]]:
    order = {}
    for value in values:
        task, separator, names = value.partition("=")
        if not separator or not task or not names:
            raise ValueError(f"--classes takes TASK=class,class,...; got {value!r}")
        order[task.strip()] = [name.strip() for name in names.split(",") if name.strip()]
    return order


@train_app.command("heads")
def heads(
    dataset_csv: Path = typer.Argument(..., help="CLAM-style dataset CSV: case_id, slide_id and one column per task."),
    features_dir: Path = typer.Option(..., "--features", help="Feature files <slide_id>.h5 (ours, TRIDENT's, CLAM's)."),
    encoder: Path = typer.Option(
        ..., help="The model repository or checkpoint whose encoder made the features; it ships with the heads."
    ),
    output_dir: Path = typer.Option(..., "--out", help="The run directory (config, splits, metrics, checkpoint)."),
    folds: int = typer.Option(5, help="k of the patient-grouped, label-stratified k-fold cross-validation."),
    splits_dir: Path | None = typer.Option(None, "--splits", help="Use CLAM split files splits_<k>.csv from here."),
    task: list[str] | None = typer.Option(None, help="A label column to train (repeatable); default: all of them."),
    classes: list[str] | None = typer.Option(
        None, help="TASK=a,b,c: a task's classes in logit order (repeatable); default sorted names."
    ),
    ordinal: list[str] | None = typer.Option(None, help="A task whose classes are ordered grades (repeatable)."),
    max_epochs: int = typer.Option(HeadsConfig.max_epochs, help="Most epochs per head."),
    patience: int = typer.Option(HeadsConfig.patience, help="Epochs without a lower validation loss before stopping."),
    learning_rate: float = typer.Option(HeadsConfig.learning_rate, "--lr", help="AdamW's peak learning rate."),
    weight_decay: float = typer.Option(HeadsConfig.weight_decay, help="AdamW's weight decay."),
    dropout: float = typer.Option(HeadsConfig.dropout, help="Dropout after the head's first layer."),
    bags_per_batch: int = typer.Option(HeadsConfig.bags_per_batch, help="Slides per optimiser step (padded, masked)."),
    max_tiles_per_bag: int = typer.Option(
        HeadsConfig.max_tiles_per_bag, help="Random tiles per slide per step in training (whole slides at evaluation)."
    ),
    seed: int = typer.Option(HeadsConfig.seed, help="Seed of the folds, the initialisation and the sampling."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of the 95% confidence intervals."),
    encoder_format: str = typer.Option("auto", help="Format of a checkpoint given as --encoder."),
    encoder_config: str = typer.Option("xmag_vitb14", help="Architecture of a non-xmag checkpoint."),
    description: str = typer.Option("", help="The provenance description the checkpoint and manifest carry."),
) -> None:
    """Train gated-ABMIL slide heads with cross-validation; write metrics, ROC curves, predictions and a checkpoint.

    The checkpoint (model.safetensors) holds the encoder and the heads, and is
    what `xmag export` takes.
    """
    from xmag.training.cross_validation import CHECKPOINT_FILE, HeadsRun, train_heads
    from xmag.training.reports import metrics_markdown

    run = HeadsRun(
        dataset_csv=dataset_csv,
        features_dir=features_dir,
        encoder=encoder,
        output_dir=output_dir,
        config=HeadsConfig(
            max_epochs=max_epochs,
            patience=patience,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            dropout=dropout,
            bags_per_batch=bags_per_batch,
            max_tiles_per_bag=max_tiles_per_bag,
            seed=seed,
        ),
        folds=folds,
        splits_dir=splits_dir,
        tasks=task or None,
        class_order=_class_order(classes or []),
        ordinal_tasks=ordinal or [],
        bootstrap_resamples=bootstrap,
        encoder_format=encoder_format,
        encoder_config=encoder_config,
        description=description,
    )
    bars: dict[tuple[str, str], object] = {}

    def on_epoch(progress) -> None:
        key = (progress.task, progress.fold)
        if key not in bars:
            for bar in bars.values():
                bar.close()  # type: ignore[attr-defined]
            bars.clear()
            name = "final" if progress.fold == "final" else f"fold {progress.fold}"
            bars[key] = progress_bar("epoch", f"{progress.task} {name}", total=progress.max_epochs)
        bar = bars[key]
        log = progress.log
        bar.set_postfix_str(f"loss {log.train_loss:.3f} val {log.val_loss:.3f} AUC {log.val_auc:.3f}")  # type: ignore[attr-defined]
        bar.update(1)  # type: ignore[attr-defined]

    try:
        summary = train_heads(run, on_epoch)
    finally:
        for bar in bars.values():
            bar.close()  # type: ignore[attr-defined]
    typer.echo(metrics_markdown(summary))
    typer.echo(f"wrote {output_dir}/ (checkpoint {output_dir / CHECKPOINT_FILE}: encoder and heads, for xmag export)")
