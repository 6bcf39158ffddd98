"""`xmag train e2e`: e2e-XMAG, the encoder's last blocks fine-tuned with an ABMIL head from slides; see training/e2e.py.

The defaults of the recipe's own options are written out here so that the
command line parses without importing torch; tests/test_train_e2e.py checks
that they are E2EConfig's.
"""

from __future__ import annotations

from pathlib import Path

import typer
from tqdm import tqdm

from xmag.cli.app import advance, progress_bar
from xmag.cli.train import train_app
from xmag.training.config import HeadsConfig

E2E_MAX_TILES_PER_BAG = 64
E2E_FROZEN_BLOCKS = 10
E2E_ENCODER_LEARNING_RATE = 1e-5
E2E_EVAL_BATCH_SIZE = 32


@train_app.command("e2e")
def e2e(
    dataset_csv: Path = typer.Argument(..., help="CLAM-style dataset CSV: case_id, slide_id and the task's column."),
    encoder: Path = typer.Option(..., help="The model repository or checkpoint whose encoder to fine-tune."),
    output_dir: Path = typer.Option(..., "--out", help="The run directory (config, splits, metrics, checkpoint)."),
    slide_dir: Path | None = typer.Option(None, help="Where the CSV's slide ids find their slide files."),
    task: str | None = typer.Option(None, help="The label column to train; default: the CSV's only one."),
    classes: str | None = typer.Option(None, help="The task's classes in logit order, comma-separated."),
    ordinal: bool = typer.Option(False, help="The task's classes are ordered grades (quadratic kappa is reported)."),
    fold: int = typer.Option(0, help="Which fold to train: its train and val parts train, its test part grades."),
    folds: int = typer.Option(5, help="k of the patient-grouped, label-stratified k-fold split."),
    splits_dir: Path | None = typer.Option(None, "--splits", help="Use CLAM split files; splits_<fold>.csv is used."),
    frozen_blocks: int = typer.Option(E2E_FROZEN_BLOCKS, help="Transformer blocks left frozen (the first N)."),
    max_epochs: int = typer.Option(HeadsConfig.max_epochs, help="Most epochs."),
    patience: int = typer.Option(HeadsConfig.patience, help="Epochs without a lower validation loss before stopping."),
    learning_rate: float = typer.Option(HeadsConfig.learning_rate, "--lr", help="AdamW's peak rate for the head."),
    encoder_learning_rate: float = typer.Option(
        E2E_ENCODER_LEARNING_RATE, "--encoder-lr", help="AdamW's peak rate for the trained blocks and final norm."
    ),
    weight_decay: float = typer.Option(HeadsConfig.weight_decay, help="AdamW's weight decay."),
    dropout: float = typer.Option(HeadsConfig.dropout, help="Dropout after the head's first layer."),
    bags_per_batch: int = typer.Option(HeadsConfig.bags_per_batch, help="Slides per optimiser step."),
    max_tiles_per_bag: int = typer.Option(
        E2E_MAX_TILES_PER_BAG, help="Random tissue tiles per slide per step in training (whole slides at evaluation)."
    ),
    eval_batch_size: int = typer.Option(E2E_EVAL_BATCH_SIZE, help="Tiles per encoder batch on whole slides."),
    gradient_checkpointing: bool = typer.Option(True, help="Recompute the trained blocks in backward (less memory)."),
    precision: str = typer.Option("auto", help="auto (bf16 where the hardware has it), bf16 or fp32."),
    device: str = typer.Option("auto", help="auto (cuda if torch sees a GPU), cpu or cuda."),
    seed: int = typer.Option(HeadsConfig.seed, help="Seed of the folds, the initialisation and the tile sampling."),
    measure_memory: bool = typer.Option(
        False, help="Measure and print one training step's activation memory, with and without checkpointing."
    ),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of the 95% confidence intervals."),
    encoder_format: str = typer.Option("auto", help="Format of a checkpoint given as --encoder."),
    encoder_config: str = typer.Option("xmag_vitb14", help="Architecture of a non-xmag checkpoint."),
    description: str = typer.Option("", help="The provenance description the checkpoint and manifest carry."),
    reader_backend: str = typer.Option("openslide", help="Slide reader: openslide or cucim."),
    fallback_mpp: float | None = typer.Option(None, "--mpp", help="Scan resolution to use if a slide states none."),
) -> None:
    """Fine-tune the encoder's last blocks jointly with a gated-ABMIL head on one fold; write metrics and a checkpoint.

    The checkpoint (model.safetensors) holds the fine-tuned encoder and the
    head, and is what `xmag export` takes.
    """
    from xmag.training.e2e import CHECKPOINT_FILE, ActivationMemory, E2EConfig, E2ERun, train_e2e
    from xmag.training.reports import metrics_markdown

    run = E2ERun(
        dataset_csv=dataset_csv,
        encoder=encoder,
        output_dir=output_dir,
        slide_dir=slide_dir,
        config=E2EConfig(
            heads=HeadsConfig(
                max_epochs=max_epochs,
                patience=patience,
                learning_rate=learning_rate,
                weight_decay=weight_decay,
                dropout=dropout,
                bags_per_batch=bags_per_batch,
                max_tiles_per_bag=max_tiles_per_bag,
                seed=seed,
            ),
            frozen_blocks=frozen_blocks,
            encoder_learning_rate=encoder_learning_rate,
            gradient_checkpointing=gradient_checkpointing,
            eval_batch_size=eval_batch_size,
            precision=precision,
            device=device,
        ),
        task=task,
        class_order=[name.strip() for name in classes.split(",") if name.strip()] if classes else None,
        ordinal=ordinal,
        fold=fold,
        folds=folds,
        splits_dir=splits_dir,
        bootstrap_resamples=bootstrap,
        encoder_format=encoder_format,
        encoder_config=encoder_config,
        description=description,
        reader_backend=reader_backend,
        fallback_mpp=fallback_mpp,
        measure_memory=measure_memory,
    )
    bars: dict[int, tqdm] = {}

    def on_progress(progress) -> None:
        if progress.epoch not in bars:
            bars[progress.epoch] = progress_bar("slide", f"epoch {progress.epoch}/{progress.max_epochs}")
        bar = bars[progress.epoch]
        advance(bar, progress.slides_done, progress.slides_total)
        if progress.log is not None:
            log = progress.log
            bar.set_postfix_str(f"loss {log.train_loss:.3f} val {log.val_loss:.3f} AUC {log.val_auc:.3f}")
            bar.close()

    try:
        summary = train_e2e(run, on_progress)
    finally:
        for bar in bars.values():
            bar.close()
    typer.echo(metrics_markdown(summary))
    e2e_summary = summary["e2e"]
    typer.echo(
        f"best epoch {e2e_summary['best_epoch']} of {e2e_summary['epochs_run']}; encoder in {e2e_summary['precision']} "
        f"on {e2e_summary['device']}; training took {e2e_summary['seconds']['training']:.1f} s"
    )
    if e2e_summary["memory"] is not None:
        typer.echo(ActivationMemory(**e2e_summary["memory"]).describe())
    typer.echo(
        f"wrote {output_dir}/ (checkpoint {output_dir / CHECKPOINT_FILE}: fine-tuned encoder and head, for xmag export)"
    )
