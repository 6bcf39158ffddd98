"""`xmag train compare`: two models' prediction files for one task, compared on the same slides."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from xmag.cli.train import train_app


@train_app.command("compare")
def compare(
    predictions_a: Path = typer.Argument(..., help="Model A's predictions_<task>.csv (from `xmag train heads`)."),
    predictions_b: Path = typer.Argument(..., help="Model B's predictions file for the same task and slides."),
    output_dir: Path | None = typer.Option(None, "--out", help="Also write comparison.json and comparison.md here."),
    ordinal: bool = typer.Option(False, help="The classes are ordered grades: also report quadratic-weighted kappa."),
) -> None:
    """Metrics of A and B side by side, DeLong's test on their AUCs and McNemar's on their accuracy (paired).

    Prints the report as Markdown. Exit status 2 when a file is missing or the two files do not hold the
    same slides, labels and classes.
    """
    from xmag.training.compare import compare_predictions, comparison_json, comparison_markdown

    comparison = compare_predictions(predictions_a, predictions_b, ordinal=ordinal)
    report = comparison_markdown(comparison)
    typer.echo(report, nl=False)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "comparison.md").write_text(report)
        (output_dir / "comparison.json").write_text(json.dumps(comparison_json(comparison), indent=2) + "\n")
        typer.echo(f"wrote {output_dir / 'comparison.md'} and {output_dir / 'comparison.json'}", err=True)
