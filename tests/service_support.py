"""Helpers of the service tests: a real uvicorn on loopback, and a model whose head was trained to find lesions."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

from xmag.export.repository import export_model_repository
from xmag.model_repo import load_model_repository
from xmag.models.abmil import GatedABMIL, SlideHeads
from xmag.models.checkpoints.xmag_format import save_encoder_checkpoint
from xmag.models.encoder import TileEncoder, build_tile_encoder
from xmag.pipeline import embed_slide
from xmag.runtimes.selection import heads_from_repository, select_encoder_runtime
from xmag.runtimes.torch_backend import TorchTileEncoder
from xmag.service.engine import Engine
from xmag.service.model import ModelDescription
from xmag.service.rest import create_app
from xmag.service.settings import ServiceSettings
from xmag.synthetic.slide import SyntheticSlide, make_synthetic_slide

LESION_TASK = "lesion"
LESION_CLASSES = ["normal", "lesion"]


def service_settings(**values) -> ServiceSettings:
    """Settings for a test service: gRPC on a free port unless told otherwise, so services never collide."""
    return ServiceSettings(**{"grpc_port": 0, **values})


@contextlib.contextmanager
def running_service(app, ready_timeout_s: float = 120.0, wait_ready: bool = True) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yield its base URL; stop it gracefully."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=30)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    try:
        if wait_ready:
            wait_until_ready(base_url, ready_timeout_s)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def wait_until_ready(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = httpx.get(f"{base_url}/readyz")
        if response.status_code == 200:
            return
        if "failed to load" in response.text:
            raise RuntimeError(response.text)
        time.sleep(0.1)
    raise TimeoutError(f"the service at {base_url} was not ready within {timeout_s} s")


def metric_value(exposition: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text, e.g. metric_value(text, 'xmag_slides_total', 'outcome="ok"')."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in exposition.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            return float(value)
    return 0.0


@dataclass(frozen=True)
class LesionModel:
    """A model repository whose head was trained here, and held-out slides to classify with it."""

    repository: Path
    slides_dir: Path
    lesion_slide: SyntheticSlide  # held out: two planted lesions
    normal_slide: SyntheticSlide  # held out: no lesion


def tile_lesion_fractions(slide: SyntheticSlide, level0_coords: np.ndarray, tile_size_level0_px: int) -> np.ndarray:
    """The fraction of each tile inside the planted lesions, from the ground-truth mask."""
    mask = slide.read_lesion_mask()
    level0_px_per_mask_px = slide.mask_um_per_px / slide.mpp
    size = max(1, int(round(tile_size_level0_px / level0_px_per_mask_px)))
    fractions = []
    for x, y in np.asarray(level0_coords):
        left, top = int(round(x / level0_px_per_mask_px)), int(round(y / level0_px_per_mask_px))
        fractions.append(float(mask[top : top + size, left : left + size].mean()))
    return np.asarray(fractions)


def _features_and_lesion_fractions(slide: SyntheticSlide, encoder: TileEncoder) -> tuple[np.ndarray, np.ndarray]:
    # The one embedding path, as the service and `xmag extract` run it.
    embedded = embed_slide(str(slide.path), TorchTileEncoder(encoder))
    return embedded.embeddings, tile_lesion_fractions(slide, embedded.level0_coords, embedded.tile_size_level0_px)


def train_lesion_head(training: list[tuple[np.ndarray, np.ndarray]], embed_dim: int, seed: int = 0) -> GatedABMIL:
    """A gated-ABMIL head trained on bags of tiles: 'lesion' when a bag holds tiles mostly inside a lesion.

    Bags are random subsets of the training slides' tiles, so a few slides give
    hundreds of labelled bags; tiles partly inside a lesion are left out as ambiguous.
    """
    rng = np.random.default_rng(seed)
    bags: list[tuple[np.ndarray, int]] = []
    for _ in range(400):
        features, fractions = training[rng.integers(len(training))]
        normal, lesion = np.flatnonzero(fractions == 0), np.flatnonzero(fractions >= 0.5)
        chosen = rng.choice(normal, size=min(int(rng.integers(10, 60)), len(normal)), replace=False)
        label = int(rng.integers(2)) if len(lesion) else 0
        if label:
            chosen = np.concatenate(
                [chosen, rng.choice(lesion, size=int(rng.integers(1, len(lesion) + 1)), replace=False)]
            )
        bags.append((features[chosen], label))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = GatedABMIL(in_dim=embed_dim, num_classes=len(LESION_CLASSES))
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(3):
        for index in rng.permutation(len(bags)):
            features, label = bags[index]
            logits, _ = head(torch.from_numpy(features))
            loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([label]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return head.eval()


def build_lesion_model(directory: Path) -> LesionModel:
    """Generate slides, train a lesion head on the tiny encoder's features, export a model repository (~25 s)."""
    slides_dir = directory / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)

    def slide(name: str, seed: int, n_lesions: int, width_px: int = 16_000, height_px: int = 12_000) -> SyntheticSlide:
        return make_synthetic_slide(
            slides_dir / f"{name}.svs",
            width_px=width_px,
            height_px=height_px,
            base_magnification=20,
            seed=seed,
            n_lesions=n_lesions,
        )

    encoder = build_tile_encoder("tiny_dinov2", seed=0).eval()
    training = [
        _features_and_lesion_fractions(s, encoder) for s in (slide("train_lesion", 21, 2), slide("train_normal", 23, 0))
    ]
    head = train_lesion_head(training, encoder.embed_dim)
    checkpoint = directory / "lesion.safetensors"
    save_encoder_checkpoint(
        encoder.vit,
        checkpoint,
        metadata={"provenance_kind": "trained", "provenance_description": "test lesion head"},
        heads=SlideHeads({LESION_TASK: head}, {LESION_TASK: LESION_CLASSES}),
    )
    repository = directory / "repo"
    export_model_repository(checkpoint, repository, model_name="tiny_lesion")
    return LesionModel(
        repository, slides_dir, slide("held_out_lesion", 22, 2), slide("held_out_normal", 24, 0, 12_000, 9_000)
    )


class HeldEncoder:
    """Wraps a real encoder runtime; `encode` waits while the gate is closed, so tests can fill the queue."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.description, self.tile_size_px, self.embed_dim = (
            encoder.description,
            encoder.tile_size_px,
            encoder.embed_dim,
        )

    def encode(self, tiles):
        self.entered.set()
        self.gate.wait(timeout=60)
        return self.encoder.encode(tiles)


def held_service_app(lesion_model, **settings_overrides):
    """An app whose engine has a held encoder; returns (app, held encoder). The gate starts open for warm-up."""
    repository = load_model_repository(lesion_model.repository)
    held = HeldEncoder(select_encoder_runtime(repository, "onnxruntime", "fp32").runtime)
    held.gate.set()

    def factory(settings, metrics):
        model = ModelDescription.of_repository(repository, held.description, [])
        return Engine(settings, held, heads_from_repository(repository), model, metrics)

    settings = service_settings(
        model_repo=lesion_model.repository, slide_roots=[lesion_model.slides_dir], **settings_overrides
    )
    return create_app(settings, factory), held
