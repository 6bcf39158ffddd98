"""The `xmag` Typer application and the one place its errors become messages and exit statuses.

Every subcommand runs inside `_Commands.invoke`, so none needs a try/except:

- a typed error of the core or a face (`XmagError`), a bad value (`ValueError`,
  pydantic's validation errors included) or a file that cannot be read or
  written (`OSError`) prints `error: <message>` and exits 2;
- a face whose extra is not installed prints which extra to install, exit 2.
"""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError
from tqdm import tqdm
from typer.core import TyperGroup

from xmag import __version__
from xmag.errors import XmagError

# The third-party module each face's extra brings, so a missing one names the extra to install.
EXTRA_OF_MODULE = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "starlette": "serve",
    "pydantic_settings": "serve",
    "prometheus_client": "serve",
    "httpx": "serve",
    "grpc": "serve",
    "grpc_health": "serve",
    "grpc_reflection": "serve",
    "google": "serve",  # protobuf
    "tritonclient": "serve",
    "pynvml": "serve",
    "onnx": "export",
    "onnxscript": "export",
    "matplotlib": "bench",  # also in [train]
    "sklearn": "train",
}


def _exit_with(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _validation_message(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())


class _Commands(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as error:
            extra = EXTRA_OF_MODULE.get((error.name or "").split(".")[0])
            if extra is None:
                raise
            _exit_with(
                f"`xmag {ctx.invoked_subcommand}` needs the [{extra}] extra, which is not installed "
                f"(no module named {error.name!r}): pip install 'xmag[{extra}]'"
            )
        except ValidationError as error:
            _exit_with(_validation_message(error))
        except (XmagError, ValueError, OSError) as error:
            _exit_with(str(error))


app = typer.Typer(
    cls=_Commands,
    name="xmag",
    help="XMAG: whole-slide-image inference with a 5x pathology encoder.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def progress_bar(unit: str, desc: str, total: int = 0) -> tqdm:
    """A progress bar on stderr (off when stderr is not a terminal)."""
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=None)


def advance(bar: tqdm, done: int, total: int) -> None:
    """Move `bar` to `done` of `total` (the total may grow as work is planned)."""
    bar.total = total
    bar.update(done - bar.n)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"xmag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """XMAG command line."""
