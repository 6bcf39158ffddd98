"""The `xmag` command: one entry point, a subcommand per job, outside the core.

Each module registers its subcommands on `xmag.cli.app.app`; subcommands only
parse arguments and call the core or a face (imported inside the command, so
`xmag info` runs without the service's or the export stage's dependencies).
Errors become messages and exit statuses in one place, `xmag.cli.app`.
"""

from xmag.cli import (  # noqa: F401 - importing them registers their commands
    bench,
    classify,
    extract,
    models,
    serve,
    slides,
    train,
    train_compare,
    train_distill,
    train_e2e,
    train_pairs,
    train_probe,
)
from xmag.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """The console script `xmag`."""
    app()
