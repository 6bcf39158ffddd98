"""The generated reference pages are current, and every relative link in the documentation resolves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_generated_pages_are_current():
    checked = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docs" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stderr


def test_relative_links_resolve():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    pages += [path for path in REPO_ROOT.glob("*/README.md") if path.parent.name not in {"tests"}]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO_ROOT)}: {target}")
    assert broken == []
