"""Shared fixtures: slides generated once per test session."""

from __future__ import annotations

import os

import pytest

from xmag.slide.reader import cucim_available
from xmag.synthetic.slide import make_synthetic_slide

# The same glass scanned at 20x and at 40x: 4.8 x 3.6 mm, one planted lesion.
GLASS_WIDTH_UM = 4_800
GLASS_HEIGHT_UM = 3_600
GLASS_SEED = 11


@pytest.fixture(scope="session")
def slides_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slides")


def _glass(slides_dir, base_magnification: int):
    mpp = 10 / base_magnification
    return make_synthetic_slide(
        slides_dir / f"glass_{base_magnification}x.svs",
        width_px=int(GLASS_WIDTH_UM / mpp),
        height_px=int(GLASS_HEIGHT_UM / mpp),
        base_magnification=base_magnification,
        seed=GLASS_SEED,
        n_lesions=1,
    )


@pytest.fixture(scope="session")
def slide_20x(slides_dir):
    return _glass(slides_dir, 20)


@pytest.fixture(scope="session")
def slide_40x(slides_dir):
    return _glass(slides_dir, 40)


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


@pytest.fixture(scope="session")
def lesion_cohort(tmp_path_factory):
    """A synthetic cohort of 20 slides (10 patients), a tiny encoder and its feature files (~1 min, once)."""
    from training_support import make_cohort_features

    return make_cohort_features(tmp_path_factory.mktemp("lesion_cohort"))


@pytest.fixture(scope="session")
def lesion_run(tmp_path_factory, lesion_cohort):
    """`xmag train heads` on the cohort: 3-fold cross-validation and the final lesion head (~30 s, once)."""
    from training_support import train_lesion_heads

    cohort, encoder_checkpoint, features_dir = lesion_cohort
    return train_lesion_heads(
        tmp_path_factory.mktemp("lesion_run"), cohort, encoder_checkpoint, features_dir, cohort.dataset_csv
    )


@pytest.fixture(scope="session")
def lesion_model(tmp_path_factory, lesion_run):
    """The lesion run's checkpoint exported as a model repository, and held-out 20x slides (~20 s, once)."""
    from service_support import build_lesion_model

    return build_lesion_model(tmp_path_factory.mktemp("lesion_model"), lesion_run)
