"""Model commands: convert official weights (`import-weights`), export a model repository, verify one."""

from __future__ import annotations

from pathlib import Path

import typer

from xmag.cli.app import app


@app.command("import-weights")
def import_weights_command(
    source: Path = typer.Argument(
        ..., help="Official weight file (XMAG release, DINOv2 hub, UNI2-h timm .bin, Phikon)."
    ),
    output: Path = typer.Argument(..., help="The XMAG checkpoint to write (.safetensors)."),
    weights_format: str = typer.Option("auto", "--format", help="auto, xmag_release, dinov2_hub, timm, hf_vit, xmag."),
    architecture: str | None = typer.Option(None, help="xmag_vitb14, uni2h, phikon_vitb16, ...; default by format."),
    heads_from: Path | None = typer.Option(None, help="Copy the slide heads stored in this XMAG checkpoint."),
) -> None:
    """Convert an official weight file into an XMAG checkpoint, recording its sha256 as provenance."""
    from xmag.export.import_weights import import_weights
    from xmag.models.checkpoints.xmag_format import HEADS_ENCODER_SHA256, load_xmag_checkpoint

    heads, heads_encoder_sha256 = None, None
    if heads_from is not None:
        stored = load_xmag_checkpoint(heads_from)
        heads, heads_encoder_sha256 = stored.heads, stored.metadata.get(HEADS_ENCODER_SHA256)
    used = import_weights(
        source,
        output,
        fmt=weights_format,
        architecture=architecture,
        heads=heads,
        heads_encoder_sha256=heads_encoder_sha256,
    )
    typer.echo(f"wrote {output} (read {source.name} as {used})")


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="XMAG checkpoint (encoder + heads), e.g. from import-weights."),
    repo: Path = typer.Option(Path("model_repo/current"), help="Model repository to write (replaced when complete)."),
    model_name: str | None = typer.Option(None, help="Triton model name; default: the architecture."),
    version: int = typer.Option(1, help="Model version directory."),
    max_batch_size: int = typer.Option(256, help="Triton max_batch_size of the encoder."),
    int8: bool = typer.Option(False, help="Also write a dynamically quantised int8 encoder for CPUs."),
    tensorrt: bool = typer.Option(False, help="Also build a TensorRT FP16 engine for this machine's GPU."),
    trt_opt_batch: int = typer.Option(64, help="TensorRT optimisation profile: optimal batch."),
    trt_max_batch: int = typer.Option(256, help="TensorRT optimisation profile: largest batch."),
) -> None:
    """Export ONNX (and optionally int8 and TensorRT) artifacts, Triton configs and a manifest with sha256 sums."""
    from xmag.export.repository import ExportOptions, export_model_repository

    options = ExportOptions(
        version=version,
        max_batch_size=max_batch_size,
        int8=int8,
        tensorrt=tensorrt,
        tensorrt_opt_batch=trt_opt_batch,
        tensorrt_max_batch=trt_max_batch,
    )
    _print_manifest(repo, export_model_repository(checkpoint, repo, options, model_name=model_name))


@app.command("verify-repo")
def verify_repo(
    repo: Path = typer.Argument(..., help="Model repository directory."),
    measure: bool = typer.Option(
        True, help="Run every encoder backend this machine has on a probe batch, as `xmag serve` does."
    ),
) -> None:
    """Check every file of a model repository against its manifest and show which encoder backend would run here."""
    from xmag.model_repo import load_model_repository
    from xmag.runtimes.selection import select_encoder_runtime

    repository = load_model_repository(repo)
    _print_manifest(repo, repository.manifest)
    if not measure:
        typer.echo("verified")
        return
    selection = select_encoder_runtime(repository)
    typer.echo("verified; encoder backends measured on this machine (the service chooses the same way):")
    for measured in selection.measurements:
        speed = f"{measured.tiles_per_s:.1f} tiles/s" if measured.tiles_per_s is not None else "not run"
        cosine = (
            f", cosine {measured.min_cosine_vs_torch_fp32:.5f}" if measured.min_cosine_vs_torch_fp32 is not None else ""
        )
        note = f" ({measured.note})" if measured.note else ""
        typer.echo(f"  {'*' if measured.chosen else ' '} {measured.description}: {speed}{cosine}{note}")


def _print_manifest(repo: Path, manifest) -> None:
    typer.echo(f"{repo}: {manifest.model_name} v{manifest.model_version}, {manifest.provenance.kind} weights")
    for artifact in manifest.artifacts:
        parity = artifact.parity
        if parity:
            measured = f"max abs {parity.max_abs_error:.2g}, min cosine {parity.min_cosine:.6f}"
        else:
            measured = "the reference" if artifact.runtime == "torch" else "no parity"
        typer.echo(
            f"  {artifact.name}: {artifact.role}{' ' + artifact.task if artifact.task else ''}, {artifact.runtime} "
            f"{artifact.precision}, {measured}{'' if artifact.usable else ' (NOT USABLE: parity below bound)'}"
        )
