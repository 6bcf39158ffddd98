"""The `triton` encoder backend against a real Triton Inference Server (pytriton's bundled one, on loopback).

The Triton model repository is built from exported repositories: the lesion
model's encoder and head, and another random tiny encoder exported with
max_batch_size 8 (the wrong model for the lesion service, and a small limit
to split batches at). Each is served by the Python-backend stand-in that
runs its exported ONNX graph (tests/triton_support.py says why and how).
One server serves the module; the test that pauses and kills a server starts
its own.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc
from service_support import LESION_TASK, running_service, service_settings
from triton_support import (
    TritonInstall,
    TritonServer,
    add_stand_in_model,
    triton_python,
)
from typer.testing import CliRunner

from xmag.contract import TRITON_EMBEDDING_DATATYPE, TRITON_TILES_DATATYPE
from xmag.export import triton_config
from xmag.export.repository import ExportOptions, export_model_repository
from xmag.model_repo import load_model_repository
from xmag.models.checkpoints.xmag_format import save_encoder_checkpoint
from xmag.models.encoder import build_tile_encoder
from xmag.runtimes.onnxruntime_backend import OnnxTileEncoder
from xmag.runtimes.protocols import EncoderBackendUnavailableError
from xmag.runtimes.selection import MIN_BACKEND_COSINE
from xmag.runtimes.triton_backend import EncoderRemoteError, TritonTileEncoder
from xmag.service.demo import free_loopback_port
from xmag.service.errors import CallerStatus, status_of
from xmag.service.loading import load_engine
from xmag.service.rest import create_app
from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tiling import XMAG_5X, iter_tile_batches, plan_tile_grid
from xmag.slide.tissue import tissue_mask_for_slide

LESION_ENCODER = "tiny_lesion"
LESION_HEAD = "tiny_lesion_head_lesion"
OTHER_ENCODER = "tiny_other"
OTHER_MAX_BATCH_SIZE = 8
TILE_SIZE_PX = 224
EMBED_DIM = 192  # tiny_dinov2


@pytest.fixture(scope="session", autouse=True)
def install() -> TritonInstall:
    """pytriton's Triton, or a failure saying how to get it; autouse and session-wide, so it fails before
    the lesion model (session-wide too, ~25 s) is built."""
    return TritonInstall.of(triton_python())


@pytest.fixture(scope="module")
def other_repository(tmp_path_factory):
    """Another random tiny encoder (seed 1), exported with max_batch_size 8."""
    root = tmp_path_factory.mktemp("other_encoder")
    encoder = build_tile_encoder("tiny_dinov2", seed=1)
    save_encoder_checkpoint(encoder.vit, root / "checkpoint.safetensors")
    options = ExportOptions(
        max_batch_size=OTHER_MAX_BATCH_SIZE,
        preferred_batch_sizes=(4, OTHER_MAX_BATCH_SIZE),
    )
    export_model_repository(
        root / "checkpoint.safetensors",
        root / "repo",
        options,
        model_name=OTHER_ENCODER,
    )
    return load_model_repository(root / "repo")


@pytest.fixture(scope="module")
def triton(install, lesion_model, other_repository, tmp_path_factory):
    work = tmp_path_factory.mktemp("triton")
    for model in (LESION_ENCODER, LESION_HEAD):
        add_stand_in_model(work / "models", lesion_model.repository, model)
    add_stand_in_model(work / "models", other_repository.root, OTHER_ENCODER)
    with TritonServer(install, work / "models", work) as server:
        print(f"tritonserver ready in {server.start_s:.1f} s")
        yield server
    print(f"tritonserver stopped in {server.stop_s:.1f} s")


@pytest.fixture(scope="module")
def slide_tiles(lesion_model):
    """32 tissue tiles at 5x from the held-out lesion slide, as the pipeline reads them."""
    with open_slide(lesion_model.lesion_slide.path) as reader:
        mpp = resolve_mpp(reader.info)
        tissue, _ = tissue_mask_for_slide(reader, mpp)
        grid = plan_tile_grid(reader.info, mpp, tissue, XMAG_5X)
        tiles, _ = next(iter_tile_batches(reader, grid, batch_size=32))
    assert tiles.shape == (32, TILE_SIZE_PX, TILE_SIZE_PX, 3) and tiles.std() > 10  # tissue, not blank glass
    return tiles


def _onnx_fp32(repository_root, model_name) -> OnnxTileEncoder:
    return OnnxTileEncoder(repository_root / model_name / "1" / "model.onnx", TILE_SIZE_PX, EMBED_DIM)


def _min_cosine(actual, expected) -> float:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.min((actual * expected).sum(1) / np.linalg.norm(actual, axis=1) / np.linalg.norm(expected, axis=1)))


def _served(server: TritonServer, model_name: str) -> tuple[int, int]:
    """(requests completed, tiles run) for the model, from Triton's own statistics."""
    with tritonclient.grpc.InferenceServerClient(server.url) as client:
        (stats,) = client.get_inference_statistics(model_name).model_stats
    return stats.inference_stats.success.count, stats.inference_count


def test_the_checked_interface_is_the_one_the_export_writes(lesion_model):
    spec = load_model_repository(lesion_model.repository).manifest.encoder
    for config in (
        triton_config.onnx_encoder_config(LESION_ENCODER, embed_dim=EMBED_DIM),
        triton_config.tensorrt_encoder_config(
            LESION_ENCODER,
            cc_model_filenames={"9.0": "model.plan"},
            max_batch_size=8,
            embed_dim=EMBED_DIM,
        ),
    ):
        (tiles,), (embedding,) = config.inputs, config.outputs
        assert (tiles.name, tiles.data_type, tiles.dims) == (
            spec.input_name,
            f"TYPE_{TRITON_TILES_DATATYPE}",
            (spec.tile_size_px, spec.tile_size_px, 3),
        )
        assert (embedding.name, embedding.data_type, embedding.dims) == (
            spec.output_name,
            f"TYPE_{TRITON_EMBEDDING_DATATYPE}",
            (spec.embed_dim,),
        )


def test_embeddings_through_triton_equal_onnxruntime_fp32(triton, lesion_model, slide_tiles):
    runtime = TritonTileEncoder(triton.url, LESION_ENCODER, TILE_SIZE_PX, EMBED_DIM)
    try:
        assert (runtime.backend, runtime.precision, runtime.triton_max_batch_size) == (
            "triton",
            "fp32",
            256,
        )
        assert runtime.description == f"triton fp32 ({LESION_ENCODER} at {triton.url})"
        actual = runtime.encode(slide_tiles)
    finally:
        runtime.close()
    expected = _onnx_fp32(lesion_model.repository, LESION_ENCODER).encode(slide_tiles)
    assert actual.dtype == np.float32 and actual.shape == expected.shape == (
        32,
        EMBED_DIM,
    )
    assert np.abs(actual - expected).max() <= 1e-4
    assert _min_cosine(actual, expected) > 0.99999


def test_batches_larger_than_the_models_max_batch_size_are_split(triton, other_repository, slide_tiles):
    tiles = slide_tiles[:20]
    runtime = TritonTileEncoder(triton.url, OTHER_ENCODER, TILE_SIZE_PX, EMBED_DIM)
    try:
        assert runtime.triton_max_batch_size == OTHER_MAX_BATCH_SIZE
        requests_before, _ = _served(triton, OTHER_ENCODER)
        actual = runtime.encode(tiles)
        assert _served(triton, OTHER_ENCODER)[0] - requests_before == 3  # 8 + 8 + 4 tiles
    finally:
        runtime.close()
    expected = _onnx_fp32(other_repository.root, OTHER_ENCODER).encode(tiles)
    assert actual.shape == (20, EMBED_DIM) and np.abs(actual - expected).max() <= 1e-4


def _classify(base_url: str, slide_path) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/classify",
        json={"slide_path": str(slide_path), "return_attention": True},
        timeout=120,
    )


def test_two_services_sharing_one_triton_answer_as_the_in_process_onnxruntime_service(triton, lesion_model):
    common = {
        "model_repo": lesion_model.repository,
        "slide_roots": [lesion_model.slides_dir],
        "read_batch_size": 16,
    }
    slide = lesion_model.lesion_slide.path
    with running_service(
        create_app(service_settings(**common, encoder_backend="onnxruntime", precision="fp32"))
    ) as base_url:
        expected = _classify(base_url, slide)
    # Two replicas on one Triton, as in the pool topology, each classifying the slide at the same time.
    triton_settings = service_settings(**common, encoder_backend="triton", triton_url=triton.url)
    _, tiles_before = _served(triton, LESION_ENCODER)
    with (
        running_service(create_app(triton_settings)) as replica_a,
        running_service(create_app(triton_settings)) as replica_b,
    ):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answer, answer_b = pool.map(lambda base_url: _classify(base_url, slide), (replica_a, replica_b))
        models = httpx.get(f"{replica_a}/v1/models").json()
    assert expected.status_code == answer.status_code == answer_b.status_code == 200, answer.text + answer_b.text
    assert answer.json()["predictions"] == answer_b.json()["predictions"]
    # Both replicas' tiles went through Triton (their start-up probes too).
    assert _served(triton, LESION_ENCODER)[1] - tiles_before >= 2 * answer.json()["slide"]["tile_count"]

    # The probe ran against torch fp32, and the one measurement is what /v1/models shows.
    (measurement,) = models["backend_measurements"]
    assert measurement["backend"] == "triton" and measurement["precision"] == "fp32" and measurement["chosen"]
    assert measurement["description"] == models["model"]["encoder"] == f"triton fp32 ({LESION_ENCODER} at {triton.url})"
    assert measurement["min_cosine_vs_torch_fp32"] >= MIN_BACKEND_COSINE and measurement["tiles_per_s"] > 0

    expected, answer = expected.json(), answer.json()
    prediction, reference = (
        answer["predictions"][LESION_TASK],
        expected["predictions"][LESION_TASK],
    )
    assert prediction["label"] == reference["label"] == "lesion"
    for name, probability in reference["probabilities"].items():
        assert prediction["probabilities"][name] == pytest.approx(probability, abs=1e-5)
    assert answer["attention"]["level0_coords"] == expected["attention"]["level0_coords"]
    weights, reference_weights = (np.asarray(a["attention"]["weights"][LESION_TASK]) for a in (answer, expected))
    assert len(weights) == answer["slide"]["tile_count"] > 50
    assert np.abs(weights - reference_weights).max() <= 1e-5


def test_a_triton_serving_another_encoder_is_refused_at_start(triton, lesion_model):
    settings = service_settings(
        model_repo=lesion_model.repository,
        slide_roots=[lesion_model.slides_dir],
        encoder_backend="triton",
        triton_url=triton.url,
        triton_model=OTHER_ENCODER,
    )
    with pytest.raises(EncoderBackendUnavailableError) as refused:
        load_engine(settings)
    message = str(refused.value)
    assert f"triton unknown ({OTHER_ENCODER} at {triton.url}): cosine " in message
    assert f"< {MIN_BACKEND_COSINE}: the server's model is not this repository's encoder" in message
    # The service reports it as the reason it is not ready.
    refused_at_start = pytest.raises(RuntimeError, match="the server's model is not this repository's encoder")
    with refused_at_start, running_service(create_app(settings)):
        pass


def test_a_model_with_another_interface_is_refused_naming_it(triton):
    with pytest.raises(EncoderBackendUnavailableError) as refused:
        TritonTileEncoder(triton.url, LESION_HEAD, TILE_SIZE_PX, EMBED_DIM)
    message = str(refused.value)
    assert f"model {LESION_HEAD!r} at Triton {triton.url} is not this repository's tile encoder" in message
    assert "it takes 'features' FP32 [-1, 192]" in message
    assert "`xmag export` writes 'tiles' UINT8 [-1, 224, 224, 3] in, 'embedding' FP32 [-1, 192] out" in message


def test_a_model_triton_does_not_have_is_named_with_those_it_has(triton):
    with pytest.raises(EncoderBackendUnavailableError) as refused:
        TritonTileEncoder(triton.url, "no_such_model", TILE_SIZE_PX, EMBED_DIM, ready_timeout_s=1)
    message = str(refused.value)
    assert f"Triton at {triton.url} is live, but model 'no_such_model' was not ready within 1 s" in message
    assert f"the server has no such model; it has ['{LESION_ENCODER}', '{LESION_HEAD}', '{OTHER_ENCODER}']" in message


def test_an_unreachable_triton_fails_within_its_deadline_saying_where(lesion_model):
    url = f"127.0.0.1:{free_loopback_port()}"
    started = time.monotonic()
    with pytest.raises(
        EncoderBackendUnavailableError,
        match=f"no Triton Inference Server answered at {url} within 1 s",
    ):
        TritonTileEncoder(url, LESION_ENCODER, TILE_SIZE_PX, EMBED_DIM, ready_timeout_s=1)
    assert time.monotonic() - started < 3
    settings = service_settings(
        model_repo=lesion_model.repository,
        slide_roots=[lesion_model.slides_dir],
        encoder_backend="triton",
        triton_url=url,
        triton_ready_timeout_s=1,
    )
    started = time.monotonic()
    with pytest.raises(
        EncoderBackendUnavailableError,
        match=f"no Triton Inference Server answered at {url} within 1 s",
    ):
        load_engine(settings)
    assert time.monotonic() - started < 3


def test_a_stalled_or_killed_triton_fails_slides_with_503_and_the_service_recovers(install, lesion_model, tmp_path):
    assert status_of(EncoderRemoteError("gone")) == CallerStatus(503, "UNAVAILABLE")
    add_stand_in_model(tmp_path / "models", lesion_model.repository, LESION_ENCODER)
    slide = lesion_model.normal_slide.path
    with TritonServer(install, tmp_path / "models", tmp_path) as server:
        settings = service_settings(
            model_repo=lesion_model.repository,
            slide_roots=[lesion_model.slides_dir],
            encoder_backend="triton",
            triton_url=server.url,
            triton_timeout_s=2,
        )
        with running_service(create_app(settings)) as base_url:
            assert _classify(base_url, slide).status_code == 200

            server.pause()  # alive but silent: each call gives up after triton_timeout_s
            started = time.monotonic()
            stalled = _classify(base_url, slide)
            stalled_s = time.monotonic() - started
            server.resume()
            assert stalled.status_code == 503, stalled.text
            assert stalled.json()["error"]["code"] == "encoder_unavailable" and stalled.headers["Retry-After"] == "5"
            assert "DEADLINE_EXCEEDED" in stalled.json()["error"]["message"] and stalled_s < 10

            assert _classify(base_url, slide).status_code == 200  # the same channel works again

            server.kill()
            started = time.monotonic()
            gone = _classify(base_url, slide)
            assert gone.status_code == 503, gone.text
            assert gone.json()["error"]["code"] == "encoder_unavailable" and time.monotonic() - started < 5
            assert server.url in gone.json()["error"]["message"]
            assert httpx.get(f"{base_url}/healthz").status_code == 200  # the service itself lives on


def test_serve_refuses_the_triton_backend_without_a_url():
    from xmag.cli import app

    refused = CliRunner().invoke(app, ["serve", "--encoder-backend", "triton"])
    assert refused.exit_code == 2 and "encoder_backend 'triton' needs triton_url" in refused.output
    bad_url = CliRunner().invoke(
        app,
        ["serve", "--encoder-backend", "triton", "--triton-url", "http://triton:8001"],
    )
    assert bad_url.exit_code == 2 and "triton_url must be host:port" in bad_url.output
