"""The choice of encoder backend by measuring: `select_encoder_runtime`, and the runtimes of a repository.

How `select_encoder_runtime` chooses, by default: it builds every candidate
this machine can run (with a CUDA GPU: the TensorRT plan if it matches the GPU
and TensorRT, torch fp32/fp16/bf16 on the GPU, onnxruntime fp32 on the GPU
providers, onnxruntime int8 on the CPU; without one: torch fp32 and bf16,
onnxruntime fp32 and, if the export marked it usable, int8, all on the CPU).
Each encodes the same probe, `probe_batch_size` seeded random uint8 tiles:
one untimed warm-up run, whose embeddings are compared with torch fp32 on the
CPU (the reference; the lowest cosine over the tiles counts), then one timed
run, or two when one is too short to time well. A candidate whose cosine is
below MIN_BACKEND_COSINE is rejected however fast it is; among the rest the
highest tiles/s wins (ties go to the earlier in the order above: TensorRT,
torch, onnxruntime). A loser is freed as soon as it loses, so besides the
torch weights (loaded once per device, shared by the torch candidates) at
most two candidates are held at once. Every candidate, including those that
cannot run here and why, is reported in `EncoderSelection.measurements`. An
explicit backend and/or precision narrows the candidates to those and raises
`EncoderBackendUnavailableError` when none can run here or none is correct.

The `triton` backend is never measured against the others: the model the
server names is the only candidate. It still encodes the probe, so a Triton
serving another model (or running this one wrongly) is refused at start by
the same cosine bound, and its tiles/s (over the network) is reported.

A repository exported before it held torch weights has no torch candidates;
its fp32 ONNX graph, which the export verified against torch fp32 (cosine
>= 0.9999), is then the reference. onnxruntime's TensorRT provider, where
installed, builds its engine during the warm-up, which lengthens start-up;
the export stage's plan does not.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from xmag.model_repo import Artifact, ModelRepository
from xmag.models.checkpoints.xmag_format import load_encoder_checkpoint
from xmag.models.encoder import TileEncoder
from xmag.runtimes.hardware import Hardware, detect_hardware, onnxruntime_gpu_providers, plan_runs_on
from xmag.runtimes.onnxruntime_backend import OnnxSlideHeads, OnnxTileEncoder
from xmag.runtimes.protocols import EncoderBackendUnavailableError, SlideHeadsRuntime, TileEncoderRuntime
from xmag.runtimes.tensorrt_backend import TensorRTTileEncoder, TensorRTUnavailableError, import_tensorrt
from xmag.runtimes.torch_backend import TorchTileEncoder
from xmag.runtimes.triton_backend import TritonEndpoint, TritonTileEncoder
from xmag.vocabulary import (
    ENCODER_BACKENDS,
    ENCODER_PRECISIONS,
    EncoderBackend,
    EncoderPrecision,
    TorchPrecision,
)

# Every backend must give embeddings at least this close (lowest cosine over the
# probe's tiles) to torch fp32 to be chosen: the bound the export sets for int8.
MIN_BACKEND_COSINE = 0.999

# A timed probe run shorter than this is run a second time and the faster run
# counts: short runs are the ones that timer resolution and noise distort most.
_SHORT_RUN_S = 0.5


@dataclass(frozen=True)
class BackendMeasurement:
    """What start-up measured of one encoder candidate, or why it was not measured."""

    description: str
    backend: str
    precision: str
    tiles_per_s: float | None  # None when not measured (cannot run here, or failed)
    min_cosine_vs_torch_fp32: float | None
    chosen: bool
    note: str = ""  # why rejected or not run, e.g. "cosine 0.997 < 0.999" or an error message


@dataclass
class EncoderSelection:
    runtime: TileEncoderRuntime
    measurements: list[BackendMeasurement]


@dataclass(frozen=True)
class _Candidate:
    """One way to run the encoder here, or why it cannot run: then `build` is None and `unavailable` says why."""

    backend: str
    precision: str
    device: str  # "cpu" or "cuda"; for triton, the server's "host:port"
    build: Callable[[], TileEncoderRuntime] | None
    unavailable: str = ""

    @property
    def description(self) -> str:
        return f"{self.backend} {self.precision} on {self.device}"


class _RuntimeFactory:
    """Builds encoder runtimes from one repository; its torch weights are read once per device and shared."""

    def __init__(self, repository: ModelRepository):
        self.repository = repository
        self.spec = repository.manifest.encoder
        self.torch_weights = next(
            (a for a in repository.manifest.artifacts if a.role == "encoder" and a.runtime == "torch"), None
        )
        self._torch_encoders: dict[str, TileEncoder] = {}

    def torch(self, precision: TorchPrecision, device: str) -> TorchTileEncoder:
        # Autocast leaves the weights as they are, so every precision on one device shares one module.
        if device not in self._torch_encoders:
            # Callers build torch runtimes only when the repository has torch weights (see `no_torch_weights`).
            assert self.torch_weights is not None
            vit = load_encoder_checkpoint(self.repository.path_of(self.torch_weights, ".safetensors"))
            self._torch_encoders[device] = TileEncoder(vit)
        return TorchTileEncoder(self._torch_encoders[device], precision, device)

    def onnx(self, artifact: Artifact, providers: tuple[str, ...]) -> OnnxTileEncoder:
        return OnnxTileEncoder(
            self.repository.path_of(artifact, ".onnx"),
            self.spec.tile_size_px,
            self.spec.embed_dim,
            providers,
            artifact.precision,
        )

    def tensorrt(self, plan: Artifact) -> TensorRTTileEncoder:
        return TensorRTTileEncoder(
            self.repository.path_of(plan, ".plan"),
            self.spec.tile_size_px,
            self.spec.embed_dim,
            input_name=self.spec.input_name,
            output_name=self.spec.output_name,
        )

    def triton(self, endpoint: TritonEndpoint, model_name: str, precision: str) -> TritonTileEncoder:
        return TritonTileEncoder(
            endpoint.url,
            model_name,
            self.spec.tile_size_px,
            self.spec.embed_dim,
            precision=precision,
            input_name=self.spec.input_name,
            output_name=self.spec.output_name,
            timeout_s=endpoint.timeout_s,
            ready_timeout_s=endpoint.ready_timeout_s,
        )


def _tensorrt_plan(encoders: list[Artifact], hardware: Hardware) -> tuple[Artifact | None, str]:
    """The repository's TensorRT plan that runs here, or None and why none does."""
    plans = [a for a in encoders if a.runtime == "tensorrt" and a.usable]
    if not plans:
        return None, "the repository has no usable TensorRT plan (export it with --tensorrt on a GPU of this kind)"
    if hardware.cuda_compute_capability is None:
        return None, "TensorRT plans need a CUDA GPU, and torch sees none"
    try:
        import_tensorrt()
    except TensorRTUnavailableError as error:
        return None, str(error)
    plan = next((a for a in plans if plan_runs_on(a, hardware)), None)
    if plan is None:
        built_for = ", ".join(
            f"compute capability {a.compute_capability} with TensorRT {a.tensorrt_version}" for a in plans
        )
        return None, (
            f"the repository's plans were built for {built_for}; this machine has compute capability "
            f"{hardware.cuda_compute_capability} with TensorRT {hardware.tensorrt_version}"
        )
    return plan, ""


def _int8_unavailable(artifact: Artifact | None, bound: float) -> str:
    if artifact is None:
        return "the repository has no int8 encoder (export it with --int8)"
    if not artifact.usable:
        assert artifact.parity is not None  # the export marks an artifact unusable only from its recorded parity
        return (
            f"{artifact.name} was marked unusable at export: its lowest cosine to torch fp32, "
            f"{artifact.parity.min_cosine:.4f}, is below {bound}"
        )
    return ""


def _available(artifact: Artifact | None) -> Artifact:
    """The artifact a candidate builds from: `candidate` builds only when its `unavailable` is empty,
    which for the TensorRT plan and the ONNX encoders holds only when the artifact was found."""
    assert artifact is not None
    return artifact


def _encoder_candidates(factory: _RuntimeFactory, hardware: Hardware) -> list[_Candidate]:
    """Every (backend, precision) the encoder is offered in, on the device it would use on `hardware`,
    each with its builder or the reason it cannot run here."""
    repository = factory.repository
    encoders = [a for a in repository.manifest.artifacts if a.role == "encoder"]

    def artifact(runtime: str, precision: str) -> Artifact | None:
        return next((a for a in encoders if a.runtime == runtime and a.precision == precision), None)

    gpu = hardware.cuda_compute_capability is not None
    no_torch_weights = (
        "" if factory.torch_weights else f"{repository.root} holds no torch weights (it predates them); export it again"
    )

    def candidate(backend: str, precision: str, device: str, unavailable: str, build: Callable[[], TileEncoderRuntime]):
        return _Candidate(backend, precision, device, None if unavailable else build, unavailable)

    def torch_candidate(precision: TorchPrecision, unavailable: str = "") -> _Candidate:
        device = "cuda" if gpu or precision == "fp16" else "cpu"
        return candidate(
            "torch", precision, device, unavailable or no_torch_weights, lambda: factory.torch(precision, device)
        )

    plan, plan_unavailable = _tensorrt_plan(encoders, hardware)
    no_onnxruntime = "" if hardware.onnxruntime_providers else "onnxruntime is not installed"
    onnx_fp32, onnx_int8 = artifact("onnxruntime", "fp32"), artifact("onnxruntime", "int8")
    gpu_providers = onnxruntime_gpu_providers(hardware)
    fp32_providers = (*gpu_providers, "CPUExecutionProvider")
    # GPUs before Ampere (compute capability 8.0) have no bf16 arithmetic.
    capability = hardware.cuda_compute_capability  # not None exactly when `gpu`
    no_bf16 = capability is not None and int(capability.split(".")[0]) < 8
    return [
        candidate("tensorrt", "fp16", "cuda", plan_unavailable, lambda: factory.tensorrt(_available(plan))),
        torch_candidate("fp16", "" if gpu else "fp16 needs a CUDA GPU, and torch sees none; on the CPU use bf16"),
        torch_candidate(
            "bf16", f"this GPU (compute capability {hardware.cuda_compute_capability}) has no bf16" if no_bf16 else ""
        ),
        torch_candidate("fp32"),
        candidate(
            "onnxruntime",
            "fp32",
            "cuda" if gpu_providers else "cpu",
            no_onnxruntime or ("" if onnx_fp32 else "the repository has no fp32 ONNX encoder"),
            lambda: factory.onnx(_available(onnx_fp32), fp32_providers),
        ),
        candidate(
            "onnxruntime",
            "int8",
            "cpu",
            no_onnxruntime or _int8_unavailable(onnx_int8, repository.manifest.int8_min_cosine),
            lambda: factory.onnx(_available(onnx_int8), ("CPUExecutionProvider",)),
        ),
    ]


def _triton_candidate(factory: _RuntimeFactory, endpoint: TritonEndpoint) -> _Candidate:
    """The encoder as Triton serves it. Its precision is the manifest's for an artifact of that name, else unknown."""
    artifacts = factory.repository.manifest.artifacts
    model_name = endpoint.model_name or next(
        (a.name for a in artifacts if a.role == "encoder" and a.runtime == "onnxruntime" and a.precision == "fp32"),
        None,
    )
    if model_name is None:
        return _Candidate(
            "triton",
            "fp32",
            endpoint.url,
            None,
            "the repository has no fp32 ONNX encoder to name the Triton model after; set triton_model",
        )
    artifact = next((a for a in artifacts if a.name == model_name and a.role == "encoder"), None)
    precision = artifact.precision if artifact is not None else "unknown"
    return _Candidate("triton", precision, endpoint.url, lambda: factory.triton(endpoint, model_name, precision))


def _min_cosine(embeddings: np.ndarray, reference: np.ndarray) -> float:
    """The lowest per-tile cosine of two (B, D) arrays; NaN if either holds a non-finite value."""
    if embeddings.shape != reference.shape:
        raise ValueError(f"the runtime returned embeddings of shape {embeddings.shape}, expected {reference.shape}")
    embeddings, reference = embeddings.astype(np.float64), reference.astype(np.float64)
    # The floor keeps an all-zero row from dividing by zero; its cosine is then 0.
    norms = np.maximum(np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1), 1e-30)
    return float(np.min(np.sum(embeddings * reference, axis=1) / norms))


def _measure(runtime: TileEncoderRuntime, probe: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(tiles per second, lowest cosine to the reference) of one runtime on the probe tiles."""
    # The untimed warm-up: first calls pay for kernel selection and allocation, which is not throughput.
    cosine = _min_cosine(np.asarray(runtime.encode(probe)), reference)
    seconds = _time_one_run(runtime, probe)
    if seconds < _SHORT_RUN_S:
        seconds = min(seconds, _time_one_run(runtime, probe))
    return len(probe) / seconds, cosine


def _time_one_run(runtime: TileEncoderRuntime, probe: np.ndarray) -> float:
    start = time.perf_counter()
    runtime.encode(probe)  # returns host memory, so a GPU runtime has finished when it returns
    return time.perf_counter() - start


def _reference_runtime(factory: _RuntimeFactory) -> TileEncoderRuntime:
    """torch fp32 on the CPU, the reference every candidate is compared with.

    A repository exported before it held torch weights has none; its fp32 ONNX
    graph stands in, which the export verified against torch fp32 (cosine >= 0.9999).
    """
    if factory.torch_weights is not None:
        return factory.torch("fp32", "cpu")
    onnx_fp32 = next(
        (
            a
            for a in factory.repository.manifest.artifacts
            if a.role == "encoder" and a.runtime == "onnxruntime" and a.precision == "fp32"
        ),
        None,
    )
    if onnx_fp32 is None:
        raise EncoderBackendUnavailableError(
            f"{factory.repository.root} has neither torch weights nor an fp32 ONNX encoder"
        )
    return factory.onnx(onnx_fp32, ("CPUExecutionProvider",))


def _not_run(candidate: _Candidate, why: str) -> BackendMeasurement:
    """The measurement of a candidate that could not be built or run here, and why."""
    return BackendMeasurement(candidate.description, candidate.backend, candidate.precision, None, None, False, why)


def select_encoder_runtime(
    repository: ModelRepository,
    backend: EncoderBackend = "auto",
    precision: EncoderPrecision = "auto",
    *,
    probe_batch_size: int = 4,
    seed: int = 0,
    triton: TritonEndpoint | None = None,
) -> EncoderSelection:
    """The fastest correct encoder runtime for this machine, and what was measured to choose it.

    "auto" (the default) for `backend` and `precision` considers every
    candidate; a named backend and/or precision only those. How candidates
    are measured and chosen is in the module docstring. Raises
    EncoderBackendUnavailableError, naming each candidate's reason, when no
    candidate asked for can run here or none gives embeddings within
    MIN_BACKEND_COSINE of torch fp32. Backend "triton" needs `triton` (where
    the server is); its own errors (unreachable, not ready, another
    interface) are raised as they are.
    """
    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"backend must be one of {ENCODER_BACKENDS}, got {backend!r}")
    if precision not in ENCODER_PRECISIONS:
        raise ValueError(f"precision must be one of {ENCODER_PRECISIONS}, got {precision!r}")
    if probe_batch_size < 1:
        raise ValueError(f"probe_batch_size must be at least 1, got {probe_batch_size}")
    if backend == "triton" and triton is None:
        raise ValueError("the triton backend needs a TritonEndpoint: the url of Triton's gRPC endpoint")
    factory = _RuntimeFactory(repository)
    if backend == "triton":
        assert triton is not None  # checked above: the triton backend without an endpoint raised ValueError
        offered = [_triton_candidate(factory, triton)]
    else:
        offered = _encoder_candidates(factory, detect_hardware())
    candidates = [c for c in offered if backend in ("auto", c.backend) and precision in ("auto", c.precision)]
    asked = " ".join(word for word in (backend, precision) if word != "auto")  # "" when both are auto
    if not candidates:
        offers = ", ".join(f"{c.backend} {c.precision}" for c in offered)
        raise EncoderBackendUnavailableError(f"no encoder backend runs {asked}; the ones offered are {offers}")
    if not any(c.build for c in candidates):
        raise EncoderBackendUnavailableError(
            f"no {asked + ' ' if asked else ''}encoder can run here: "
            + "; ".join(f"{c.description}: {c.unavailable}" for c in candidates)
        )

    spec = repository.manifest.encoder
    probe = np.random.default_rng(seed).integers(
        0, 256, (probe_batch_size, spec.tile_size_px, spec.tile_size_px, 3), np.uint8
    )
    reference = np.asarray(_reference_runtime(factory).encode(probe))

    measurements: list[BackendMeasurement] = []
    best: TileEncoderRuntime | None = None
    best_index, best_tiles_per_s = -1, 0.0
    for candidate in candidates:
        if candidate.build is None:
            measurements.append(_not_run(candidate, candidate.unavailable))
            continue
        try:
            runtime = candidate.build()
            tiles_per_s, cosine = _measure(runtime, probe, reference)
        except Exception as error:  # a backend that fails on this machine must not stop the others
            if candidate.backend == "triton":
                raise  # the only candidate; its error names the server and the model, and says what is wrong
            measurements.append(_not_run(candidate, f"failed: {type(error).__name__}: {error}"))
            continue
        # Written so that a NaN cosine (non-finite embeddings) is rejected too.
        correct = cosine >= MIN_BACKEND_COSINE
        note = "" if correct else f"cosine {cosine:.4f} < {MIN_BACKEND_COSINE}"
        if not correct and candidate.backend == "triton":
            note += ": the server's model is not this repository's encoder, or does not run it correctly"
        measurements.append(
            BackendMeasurement(
                runtime.description, candidate.backend, candidate.precision, tiles_per_s, cosine, False, note
            )
        )
        if correct and tiles_per_s > best_tiles_per_s:
            best, best_index, best_tiles_per_s = runtime, len(measurements) - 1, tiles_per_s
        del runtime  # a loser is freed now, not when the loop ends

    if best is None:
        raise EncoderBackendUnavailableError(
            f"no {asked + ' ' if asked else ''}encoder gives correct embeddings here "
            f"(cosine to torch fp32 >= {MIN_BACKEND_COSINE}): "
            + "; ".join(f"{m.description}: {m.note}" for m in measurements)
        )
    measurements[best_index] = dataclasses.replace(measurements[best_index], chosen=True)
    return EncoderSelection(best, measurements)


def heads_from_repository(repository: ModelRepository) -> OnnxSlideHeads:
    """The ONNX heads of every task of a verified repository, run by onnxruntime on the CPU (they are small)."""
    manifest = repository.manifest
    return OnnxSlideHeads(
        {task.name: repository.path_of(manifest.artifact(task.head_artifact), ".onnx") for task in manifest.tasks},
        {task.name: task.class_names for task in manifest.tasks},
    )


def runtimes_from_repository(
    repository: ModelRepository, backend: EncoderBackend = "auto", precision: EncoderPrecision = "auto"
) -> tuple[TileEncoderRuntime, SlideHeadsRuntime]:
    """The encoder chosen by `select_encoder_runtime` and the heads of every task, from a verified repository."""
    return select_encoder_runtime(repository, backend, precision).runtime, heads_from_repository(repository)
