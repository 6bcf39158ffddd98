"""Loading the engine: verify the model repository, choose the encoder backend by measuring, build the engine.

The repository is a path in the settings; whoever starts the service and
wants the demo repository builds it first (`xmag serve` does, on the loader
thread, so `/healthz` answers while it is built).
"""

from __future__ import annotations

import dataclasses

import torch

from xmag.model_repo import load_model_repository
from xmag.runtimes.selection import heads_from_repository, select_encoder_runtime
from xmag.runtimes.triton_backend import TritonEndpoint
from xmag.service.engine import Engine
from xmag.service.metrics import ServiceMetrics
from xmag.service.model import ModelDescription
from xmag.service.settings import ServiceSettings
from xmag.slide.reader import require_reader_backend


def load_engine(settings: ServiceSettings, metrics: ServiceMetrics | None = None) -> Engine:
    """The engine on `settings.model_repo`, verified, with the fastest correct encoder backend (or the one asked for)."""
    if settings.model_repo is None:
        raise ValueError("no model repository is configured (model_repo / XMAG_MODEL_REPO)")
    require_reader_backend(settings.reader_backend)
    repository = load_model_repository(settings.model_repo)
    # A GPU is measured at a serving-size batch (small batches rank GPU backends unfairly); a CPU at 4
    # tiles, which ranked the CPU backends as batch 16 does and keeps start-up to seconds.
    probe_batch_size = min(64, settings.max_batch_size) if torch.cuda.is_available() else 4
    triton = (
        TritonEndpoint(
            settings.triton_url, settings.triton_model, settings.triton_timeout_s, settings.triton_ready_timeout_s
        )
        if settings.encoder_backend == "triton"
        else None
    )
    selection = select_encoder_runtime(
        repository, settings.encoder_backend, settings.precision, probe_batch_size=probe_batch_size, triton=triton
    )
    measurements = [dataclasses.asdict(m) for m in selection.measurements]
    model = ModelDescription.of_repository(repository, selection.runtime.description, measurements)
    return Engine(settings, selection.runtime, heads_from_repository(repository), model, metrics)
