"""Running the real `xmag` command in a child process in which some libraries are absent."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# None in sys.modules is how Python marks a module as not importable: `import` raises ModuleNotFoundError
# and importlib.util.find_spec answers None, exactly as for a library that is not installed.
_RUN_WITHOUT = textwrap.dedent(
    """
    import sys

    for name in sys.argv[1].split(","):
        sys.modules[name] = None
    sys.argv = ["xmag", *sys.argv[2:]]
    from xmag.cli import main

    main()
    """
)


def xmag_without(absent: list[str], *arguments: str, cwd=None) -> subprocess.CompletedProcess:
    """`xmag ARGUMENTS...` with the modules `absent` not importable; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-c", _RUN_WITHOUT, ",".join(absent), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
