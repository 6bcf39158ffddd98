"""`python -m xmag` runs the command line."""

from xmag.cli import app

app()
