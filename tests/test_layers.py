"""The house's layers: what a regular install of the project contains, and the import-linter contracts over it.

import-linter reads a regular (non-editable) install, where the faces' folders
sit inside the `xmag` package as every user gets them; `make lint` runs the
same check. One test proves the contracts can fail: an upward import added to
a core module of a copy of the install breaks them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = REPO_ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# The folders whose packages install under the xmag namespace, by their import name.
FOLDERS = {
    "xmag": "xmag",
    "cli": "xmag.cli",
    "service": "xmag.service",
    "export": "xmag.export",
    "training": "xmag.training",
    "benchmarks": "xmag.benchmarks",
}


@pytest.fixture(scope="module")
def layered_install(tmp_path_factory) -> Path:
    """`pip install --target` of the working tree: the project as site-packages would hold it."""
    target = tmp_path_factory.mktemp("layers") / "site"
    # setuptools builds in build/lib and never removes what was deleted since; a stale copy would be installed.
    shutil.rmtree(REPO_ROOT / "build" / "lib", ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def _lint_imports(site: Path) -> subprocess.CompletedProcess:
    # From inside the install, so that `xmag` is found there and not in the working tree.
    return subprocess.run([str(LINT_IMPORTS), str(PYPROJECT)], cwd=site, capture_output=True, text=True, timeout=300)


def test_nothing_generic_is_installed(layered_install):
    installed = {path.name for path in layered_install.iterdir()}
    assert installed - {"bin"} == {"xmag", "xmag-0.1.0.dist-info"}, installed
    for import_name in FOLDERS.values():
        assert (layered_install / import_name.replace(".", "/") / "__init__.py").is_file(), import_name


def test_every_package_folder_is_listed_for_setuptools():
    listed = set(tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, import_name in FOLDERS.items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO_ROOT / folder)
            found.add(".".join([import_name, *relative.parts]))
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


def test_the_layer_contracts_are_kept(layered_install):
    checked = _lint_imports(layered_install)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "0 broken" in checked.stdout


@pytest.mark.parametrize(
    ("module", "upward_import", "reason"),
    [
        ("xmag/errors.py", "import xmag.service.engine", "the core imports a face"),
        ("xmag/service/engine.py", "import xmag.export.demo", "a face imports another"),
        ("xmag/pipeline.py", "import fastapi", "the core imports a library of the serve extra"),
    ],
)
def test_an_upward_import_breaks_the_contracts(layered_install, tmp_path, module, upward_import, reason):
    site = tmp_path / "site"
    shutil.copytree(layered_install, site)
    installed = site / module
    installed.write_text(installed.read_text() + f"\n{upward_import}\n")
    checked = _lint_imports(site)
    assert checked.returncode != 0, f"{reason}, and the contracts did not notice:\n{checked.stdout}"
    assert "BROKEN" in checked.stdout
