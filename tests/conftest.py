"""Shared fixtures: slides generated once per test session."""

from __future__ import annotations

import os

import pytest

from xmag.slide.reader import cucim_available
from xmag.slide.synthetic import make_synthetic_slide

# The same glass scanned at 20x and at 40x: 4.8 x 3.6 mm, one planted lesion.
GLASS_WIDTH_UM = 4_800
GLASS_HEIGHT_UM = 3_600
GLASS_SEED = 11


@pytest.fixture(scope="session")
def slides_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def slide_20x(slides_dir):
    return make_synthetic_slide(
        slides_dir / "glass_20x.svs",
        width_px=int(GLASS_WIDTH_UM / 0.5),
        height_px=int(GLASS_HEIGHT_UM / 0.5),
        base_magnification=20,
        seed=GLASS_SEED,
        n_lesions=1,
    )


@pytest.fixture(scope="session")
def slide_40x(slides_dir):
    return make_synthetic_slide(
        slides_dir / "glass_40x.svs",
        width_px=int(GLASS_WIDTH_UM / 0.25),
        height_px=int(GLASS_HEIGHT_UM / 0.25),
        base_magnification=40,
        seed=GLASS_SEED,
        n_lesions=1,
    )


def require_cucim() -> None:
    """Fail where the set-up promised cuCIM (make test); otherwise skip and say why."""
    if cucim_available():
        return
    message = (
        "cuCIM is not installed, so the cuCIM backend was not tested. "
        "`make test` installs it (pip install --no-deps cucim-cu12)."
    )
    if os.environ.get("XMAG_REQUIRE_CUCIM"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(params=["openslide", "cucim"])
def backend(request):
    """Both reader backends; cuCIM is required under `make test`."""
    if request.param == "cucim":
        require_cucim()
    return request.param
