"""`python -m xmag.cli` runs the `xmag` command (the service's demo starts `xmag serve` this way)."""

from xmag.cli import main

main()
