"""The embedded default: a generated demo slide and untrained demo weights.

No trained weights ship with the code and none can be downloaded, so the main
job runs on randomly initialised models with fixed seeds. Their predictions
carry no meaning, and everything that shows them says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from xmag.models.abmil import GatedABMIL, SlideHeads
from xmag.models.encoder import TileEncoder, build_tile_encoder
from xmag.synthetic.slide import SyntheticSlide, make_synthetic_slide

DEMO_WEIGHTS_NOTICE = (
    "UNTRAINED DEMO WEIGHTS: the encoder and heads are randomly initialised (fixed seeds); "
    "the predictions below are meaningless. For real results, pass --model-repo with a repository "
    "exported from trained weights (or --weights with a checkpoint)."
)
DEMO_MODEL_NOTICE = (
    "DEMO MODEL: the encoder is untrained (the student architecture with seeded random weights) and the head was "
    "trained by `xmag train heads` on a few synthetic slides with planted lesions. It finds those lesions and "
    "means nothing for real tissue. For real results, pass --model-repo with a repository exported from trained "
    "weights (or --weights with a checkpoint)."
)
DEMO_HEADS_NOTICE = (
    "UNTRAINED DEMO HEADS: the encoder weights are yours, but no trained slide head was given, so the "
    "MIL head is randomly initialised and its predictions are meaningless."
)
DEMO_ENCODER_CONFIG = "xmag_vitb14"
DEMO_WORKDIR = Path("out/demo")  # the demo slide, cohort, features and heads run; the demo service's slide root
DEMO_TASK = "lesion"
DEMO_CLASSES = ("normal", "lesion")


def demo_encoder(seed: int = 0) -> TileEncoder:
    """The XMAG student architecture (DINOv2 ViT-B/14) with seeded random weights."""
    return build_tile_encoder(DEMO_ENCODER_CONFIG, seed=seed).eval()


def demo_heads(embed_dim: int, seed: int = 0) -> SlideHeads:
    """One untrained gated-attention MIL head for a two-class demo task."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = GatedABMIL(in_dim=embed_dim, num_classes=len(DEMO_CLASSES))
    return SlideHeads({DEMO_TASK: head}, {DEMO_TASK: list(DEMO_CLASSES)}).eval()


def ensure_demo_slide(directory: Path) -> SyntheticSlide:
    """Write the demo slide (20x, 6 x 4.5 mm, one planted lesion); a second or two, so it is not cached."""
    directory.mkdir(parents=True, exist_ok=True)
    return make_synthetic_slide(
        directory / "demo_slide.svs", width_px=12_000, height_px=9_000, base_magnification=20, seed=7, n_lesions=1
    )
