"""Helpers of the service tests: a real uvicorn on loopback, and a model whose head was trained to find lesions
(by the training package: tests/training_support.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from training_support import LESION_TASK, LesionRun

from xmag.export.repository import export_model_repository
from xmag.model_repo import load_model_repository
from xmag.runtimes.selection import heads_from_repository, select_encoder_runtime
from xmag.service.engine import Engine
from xmag.service.model import ModelDescription
from xmag.service.rest import create_app
from xmag.service.settings import ServiceSettings
from xmag.synthetic.dataset import tile_lesion_fractions
from xmag.synthetic.slide import SyntheticSlide, make_synthetic_slide

__all__ = ["LESION_TASK", "tile_lesion_fractions"]  # for the service tests, with the helpers below


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


def build_lesion_model(directory: Path, run: LesionRun) -> LesionModel:
    """Export the heads run's checkpoint (trained by the training package) as a repository; write held-out slides."""
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

    repository = directory / "repo"
    export_model_repository(run.checkpoint, repository, model_name="tiny_lesion")
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
