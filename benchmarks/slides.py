"""Benchmark slides: generated once, cached, sized like the paper's average slide.

The paper's benchmark slides average 554 tiles at 5x (224 px) and 6,260 at
20x (256 px). A synthetic 20x slide of 43,000 x 32,250 px (21.5 x 16.1 mm)
carries about that much tissue; the exact counts vary with the seed and are
reported with every result. The 40x variant is the same glass (same seed) at
0.25 µm/px, so it has the same tissue and grids but a pyramid twice as fine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xmag.synthetic.slide import make_synthetic_slide

GLASS_WIDTH_UM = 21_500
GLASS_HEIGHT_UM = 16_125
QUICK_GLASS_UM = (4_800, 3_600)  # the test glass: ~32 tiles at 5x, for --quick


@dataclass(frozen=True)
class BenchmarkSlide:
    name: str
    path: Path
    base_magnification: int


def ensure_benchmark_slides(
    directory: Path,
    count: int,
    magnifications: tuple[int, ...] = (20,),
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[BenchmarkSlide]:
    """`count` glasses at each base magnification, written once under `directory` and reused afterwards."""
    width_um, height_um = QUICK_GLASS_UM if quick else (GLASS_WIDTH_UM, GLASS_HEIGHT_UM)
    slides = []
    directory.mkdir(parents=True, exist_ok=True)
    for seed in range(1, count + 1):
        for magnification in magnifications:
            mpp = 10 / magnification
            name = f"{'quick' if quick else 'bench'}_s{seed}_{magnification}x"
            path = directory / f"{name}.svs"
            done_marker = path.with_name(f"{path.name}.complete")  # an interrupted write leaves no marker
            if not done_marker.is_file():
                if progress is not None:
                    progress(f"generating benchmark slide {path} (once; cached afterwards)")
                make_synthetic_slide(
                    path,
                    width_px=int(width_um / mpp),
                    height_px=int(height_um / mpp),
                    base_magnification=magnification,
                    seed=seed,
                    n_lesions=2,
                )
                done_marker.touch()
            slides.append(BenchmarkSlide(name, path, magnification))
    return slides
