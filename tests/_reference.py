"""Locating and reading the numeric reference fixtures (see tests/reference/README.md).

The fixtures are outputs of the official DINOv2 and timm implementations (data,
not code), committed under tests/reference so that a fresh clone tests with
nothing beside it; $XMAG_REFERENCE_DIR points elsewhere. Missing fixtures fail
the test that needs them: a reference check that silently skips proves nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """The fixture directory, or pytest.fail saying where it looked."""
    # An explicit setting is the only place looked at, so a typo in it is not hidden by the default.
    configured = os.environ.get("XMAG_REFERENCE_DIR")
    candidate = Path(configured) if configured else REPO_ROOT / "tests" / "reference"
    if not candidate.is_dir():
        where = "set by $XMAG_REFERENCE_DIR" if configured else "the default location"
        pytest.fail(
            f"reference fixtures not found: looked in {candidate} ({where}); point "
            "$XMAG_REFERENCE_DIR at the folder holding dinov2_small_official.safetensors"
        )
    return candidate


def reference_path(file_name: str) -> Path:
    """Path of one fixture file, failing the test if it is absent."""
    path = reference_dir() / file_name
    if not path.is_file():
        pytest.fail(f"reference fixture missing: {path}")
    return path


def load_fixture(file_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state dict with the official keys, every other tensor: `input`, `out.*`)."""
    tensors = load_file(reference_path(file_name))
    prefix = "state_dict."
    state_dict = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    others = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    return state_dict, others


def key_list(file_name: str) -> list[tuple[str, tuple[int, ...]]]:
    """The `[key, shape]` list of a full-size official state dict."""
    entries = json.loads(reference_path(file_name).read_text())
    return [(key, tuple(shape)) for key, shape in entries]
