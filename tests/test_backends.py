"""Encoder backends from a model repository: parity with torch fp32, and the choice by measuring.

Everything runs on real exported repositories of a tiny DINOv2 and on tiles
read from a generated slide. The CUDA and TensorRT tests run wherever a GPU
(and TensorRT) is present and say why they were skipped elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil

import numpy as np
import pytest
import torch

from xmag.errors import XmagError
from xmag.export.repository import ExportOptions, export_model_repository
from xmag.model_repo import ModelRepositoryError, load_model_repository, sha256_of
from xmag.models.abmil import SlideHeads
from xmag.models.checkpoints.xmag_format import load_xmag_checkpoint, save_encoder_checkpoint
from xmag.models.encoder import build_tile_encoder
from xmag.runtimes.onnxruntime_backend import OnnxSlideHeads
from xmag.runtimes.protocols import EncoderBackendUnavailableError
from xmag.runtimes.selection import (
    MIN_BACKEND_COSINE,
    heads_from_repository,
    runtimes_from_repository,
    select_encoder_runtime,
)
from xmag.runtimes.tensorrt_backend import TensorRTBatchSizeError, TensorRTTileEncoder, TensorRTUnavailableError
from xmag.runtimes.torch_backend import TorchTileEncoder
from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tiling import XMAG_5X, iter_tile_batches, plan_tile_grid
from xmag.slide.tissue import tissue_mask_for_slide

MODEL = "tiny_dinov2"
CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA GPU here (torch sees none), so the CUDA backends were not run"


def _export(root, encoder, options=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        heads = SlideHeads.from_class_names({"tumour": ["benign", "malignant"]}, in_dim=encoder.embed_dim).eval()
    save_encoder_checkpoint(encoder.vit, root / "checkpoint.safetensors", heads=heads)
    export_model_repository(root / "checkpoint.safetensors", root / "repo", options or ExportOptions(int8=True))
    return load_model_repository(root / "repo", expected_model_name=MODEL)


@pytest.fixture(scope="module")
def encoder():
    return build_tile_encoder(MODEL, seed=0)


@pytest.fixture(scope="module")
def repository(tmp_path_factory, encoder):
    return _export(tmp_path_factory.mktemp("backends"), encoder)


@pytest.fixture(scope="module")
def fragile_repository(tmp_path_factory):
    """A real model that bf16 and int8 cannot carry, exported as usual.

    The last MLP adds a large constant (10) to every channel, which the final
    LayerNorm removes again: in fp32 the small signal beside it survives, in
    bf16 (spacing 0.06 at 10) it is rounded away. One channel of the last
    pre-MLP LayerNorm is scaled by 1000 (and ignored by the next layer), an
    outlier that stretches int8's per-tensor activation range until the other
    channels lose their resolution.
    """
    fragile = build_tile_encoder(MODEL, seed=0)
    block = fragile.vit.blocks[-1]
    with torch.no_grad():
        block.mlp.fc2.bias.fill_(10.0)
        block.norm2.weight[0] = 1000.0
        block.mlp.fc1.weight[:, 0] = 0.0
    return _export(tmp_path_factory.mktemp("fragile"), fragile)


@pytest.fixture(scope="module")
def slide_tiles(slide_20x):
    """16 tissue tiles at 5x from the generated slide, as the pipeline reads them."""
    with open_slide(slide_20x.path) as reader:
        mpp = resolve_mpp(reader.info)
        tissue, _ = tissue_mask_for_slide(reader, mpp)
        grid = plan_tile_grid(reader.info, mpp, tissue, XMAG_5X)
        tiles, _ = next(iter_tile_batches(reader, grid, batch_size=16))
    assert tiles.shape == (16, 224, 224, 3) and tiles.std() > 10  # real tissue, not blank glass
    return tiles


def _random_tiles(count, seed=3):
    return np.random.default_rng(seed).integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)


def _min_cosine(actual, expected):
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.min((actual * expected).sum(1) / np.linalg.norm(actual, axis=1) / np.linalg.norm(expected, axis=1)))


def _assert_matches_torch_fp32(runtime, encoder, tiles):
    expected = TorchTileEncoder(encoder).encode(tiles)
    actual = runtime.encode(tiles)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert _min_cosine(actual, expected) >= MIN_BACKEND_COSINE, runtime.description


# --- the torch weights in the repository -------------------------------------------------------


def test_torch_weights_are_a_verified_root_file_of_the_repository(repository, encoder):
    root, manifest = repository.root, repository.manifest
    weights = manifest.artifact(f"{MODEL}_torch")
    assert (weights.role, weights.runtime, weights.precision, weights.usable) == ("encoder", "torch", "fp32", True)
    (record,) = weights.files
    assert record.path == f"{MODEL}_torch.safetensors"  # at the root: Triton takes every directory for a model
    assert record.sha256 == sha256_of(root / record.path)
    # Every directory is a Triton model with its config; the root holds only files Triton ignores.
    assert {p.name for p in root.iterdir() if p.is_file()} == {"manifest.json", record.path}
    assert all((d / "config.pbtxt").is_file() for d in root.iterdir() if d.is_dir())
    # The encoder only, with exactly the exported weights.
    checkpoint = load_xmag_checkpoint(root / record.path)
    assert checkpoint.heads is None
    for name, tensor in encoder.vit.state_dict().items():
        assert torch.equal(checkpoint.vit.state_dict()[name], tensor), name


def test_tampered_torch_weights_are_refused(repository, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repository.root, copy)
    weights = copy / f"{MODEL}_torch.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensors, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelRepositoryError, match=f"{MODEL}_torch.safetensors in .* does not match its manifest"):
        load_model_repository(copy)


def test_torch_weights_in_a_subdirectory_are_refused(repository, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repository.root, copy)
    (copy / "weights").mkdir()
    shutil.move(copy / f"{MODEL}_torch.safetensors", copy / "weights" / f"{MODEL}_torch.safetensors")
    manifest_path = copy / "manifest.json"
    manifest_path.write_text(
        manifest_path.read_text().replace(f'"{MODEL}_torch.safetensors"', f'"weights/{MODEL}_torch.safetensors"')
    )
    with pytest.raises(ModelRepositoryError, match="belong at the repository root"):
        load_model_repository(copy)


# --- parity of every backend that runs here -----------------------------------------------------


@pytest.mark.parametrize("backend, precision", [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32")])
def test_backend_matches_torch_fp32(repository, encoder, slide_tiles, backend, precision):
    runtime = select_encoder_runtime(repository, backend, precision).runtime
    assert (runtime.backend, runtime.precision) == (backend, precision)
    assert (runtime.tile_size_px, runtime.embed_dim) == (224, encoder.embed_dim)
    _assert_matches_torch_fp32(runtime, encoder, slide_tiles)
    _assert_matches_torch_fp32(runtime, encoder, _random_tiles(5))


def test_int8_matches_torch_fp32_or_is_marked_unusable_and_never_chosen(repository, encoder, slide_tiles):
    int8 = repository.manifest.artifact(f"{MODEL}_int8")
    if not int8.usable:
        assert int8.parity.min_cosine < repository.manifest.int8_min_cosine
        with pytest.raises(EncoderBackendUnavailableError, match="marked unusable at export"):
            select_encoder_runtime(repository, "onnxruntime", "int8")
        assert select_encoder_runtime(repository).runtime.precision != "int8"
        return
    runtime = select_encoder_runtime(repository, "onnxruntime", "int8").runtime
    assert runtime.description == "onnxruntime int8 (CPUExecutionProvider)"
    _assert_matches_torch_fp32(runtime, encoder, slide_tiles)
    _assert_matches_torch_fp32(runtime, encoder, _random_tiles(5))


def test_fp16_on_the_cpu_is_refused(encoder):
    with pytest.raises(ValueError, match="fp16 runs on CUDA GPUs only"):
        TorchTileEncoder(encoder, "fp16", "cpu")


# --- choosing by measuring ----------------------------------------------------------------------


def test_auto_chooses_the_fastest_correct_candidate(repository):
    selection = select_encoder_runtime(repository)
    measured = [m for m in selection.measurements if m.tiles_per_s is not None]
    (chosen,) = [m for m in selection.measurements if m.chosen]
    assert chosen.description == selection.runtime.description
    correct = [m for m in measured if m.min_cosine_vs_torch_fp32 >= MIN_BACKEND_COSINE]
    assert chosen.tiles_per_s == max(m.tiles_per_s for m in correct)
    # Every candidate that can run here was measured, against torch fp32 itself among them.
    expected = {("torch", "fp32"), ("onnxruntime", "fp32")} | (
        {("torch", "fp16"), ("torch", "bf16")} if CUDA else {("torch", "bf16")}
    )
    if repository.manifest.artifact(f"{MODEL}_int8").usable:
        expected.add(("onnxruntime", "int8"))
    assert expected <= {(m.backend, m.precision) for m in measured}
    # What cannot run here is listed with the reason; what ran and was correct needs no note.
    for m in selection.measurements:
        if m.tiles_per_s is None:
            assert m.note and m.min_cosine_vs_torch_fp32 is None and not m.chosen
        elif m.min_cosine_vs_torch_fp32 >= MIN_BACKEND_COSINE:
            assert m.note == ""
    if not CUDA:
        notes = {m.description: m.note for m in selection.measurements}
        assert notes["torch fp16 on cuda"].startswith("fp16 needs a CUDA GPU")
        assert "no usable TensorRT plan" in notes["tensorrt fp16 on cuda"]
        torch_fp32 = next(m for m in measured if m.description == "torch fp32 on cpu")
        assert torch_fp32.min_cosine_vs_torch_fp32 > 0.99999  # the reference itself


def test_auto_rejects_incorrect_candidates_however_fast(fragile_repository):
    manifest = fragile_repository.manifest
    int8 = manifest.artifact(f"{MODEL}_int8")
    assert not int8.usable and int8.parity.min_cosine < manifest.int8_min_cosine  # the export caught int8
    selection = select_encoder_runtime(fragile_repository)
    bf16 = next(m for m in selection.measurements if m.precision == "bf16")
    if bf16.tiles_per_s is not None:  # measured (a GPU without bf16 lists it as unavailable instead)
        assert bf16.min_cosine_vs_torch_fp32 < MIN_BACKEND_COSINE and not bf16.chosen
        assert bf16.note == f"cosine {bf16.min_cosine_vs_torch_fp32:.4f} < {MIN_BACKEND_COSINE}"
    int8_measurement = next(m for m in selection.measurements if m.precision == "int8")
    assert int8_measurement.tiles_per_s is None and "marked unusable at export" in int8_measurement.note
    assert selection.runtime.precision not in ("bf16", "int8")
    (chosen,) = [m for m in selection.measurements if m.chosen]
    assert chosen.min_cosine_vs_torch_fp32 >= MIN_BACKEND_COSINE


def test_an_explicit_incorrect_choice_is_refused_with_its_cosine(fragile_repository):
    with pytest.raises(EncoderBackendUnavailableError, match=r"torch bf16 on \w+: cosine 0\.\d+ < 0\.999"):
        select_encoder_runtime(fragile_repository, "torch", "bf16")


def test_an_explicit_choice_is_measured_alone(repository):
    selection = select_encoder_runtime(repository, "onnxruntime", "fp32")
    (measurement,) = selection.measurements
    assert measurement.chosen and measurement.tiles_per_s > 0
    assert measurement.description == selection.runtime.description


@pytest.mark.parametrize(
    "backend, precision, message",
    [
        ("onnxruntime", "bf16", "no encoder backend runs onnxruntime bf16; the ones offered are tensorrt fp16, "),
        ("tensorrt", "fp32", "no encoder backend runs tensorrt fp32"),
        ("torch", "int8", "no encoder backend runs torch int8"),
    ],
)
def test_combinations_that_do_not_exist_are_refused(repository, backend, precision, message):
    with pytest.raises(EncoderBackendUnavailableError, match=message):
        select_encoder_runtime(repository, backend, precision)


def test_unavailable_explicit_choices_say_why(repository, fragile_repository):
    assert issubclass(EncoderBackendUnavailableError, XmagError)
    with pytest.raises(
        EncoderBackendUnavailableError, match=r"no tensorrt encoder can run here: .*no usable TensorRT plan"
    ):
        select_encoder_runtime(repository, "tensorrt")
    with pytest.raises(EncoderBackendUnavailableError, match=r"onnxruntime int8 on cpu: .*marked unusable at export"):
        select_encoder_runtime(fragile_repository, "onnxruntime", "int8")
    if not CUDA:
        with pytest.raises(EncoderBackendUnavailableError, match="torch fp16 on cuda: fp16 needs a CUDA GPU"):
            select_encoder_runtime(repository, "torch", "fp16")
    with pytest.raises(ValueError, match="backend must be one of"):
        select_encoder_runtime(repository, "openvino")


def test_a_tensorrt_plan_that_cannot_run_here_says_why(repository):
    # A plan for a GPU generation no machine has (compute capability 1.0): the manifest entry is
    # enough, since no candidate that cannot run is ever built.
    onnx = repository.manifest.artifact(MODEL)
    plan = onnx.model_copy(
        update={
            "name": f"{MODEL}_trt",
            "runtime": "tensorrt",
            "precision": "fp16",
            "compute_capability": "1.0",
            "tensorrt_version": "10.0.0",
        }
    )
    with_plan = dataclasses.replace(
        repository,
        manifest=repository.manifest.model_copy(update={"artifacts": [*repository.manifest.artifacts, plan]}),
    )
    if not CUDA:
        reason = "TensorRT plans need a CUDA GPU"
    elif importlib.util.find_spec("tensorrt") is None:
        reason = "TensorRT cannot be imported"
    else:
        reason = "plans were built for compute capability 1.0 with TensorRT 10.0.0"
    with pytest.raises(EncoderBackendUnavailableError, match=f"tensorrt fp16 on cuda: {reason}"):
        select_encoder_runtime(with_plan, "tensorrt")


def test_runtimes_from_repository_gives_the_chosen_encoder_and_every_head(repository, slide_tiles):
    encoder, heads = runtimes_from_repository(repository)
    assert encoder.backend in ("torch", "onnxruntime", "tensorrt")
    assert isinstance(heads, OnnxSlideHeads) and set(heads.class_names) == {"tumour"}
    predictions = heads.predict(encoder.encode(slide_tiles))
    assert predictions["tumour"].attention.shape == (16,)
    assert set(heads_from_repository(repository).class_names) == {"tumour"}


# --- CUDA and TensorRT: real runs where present --------------------------------------------------


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_cuda_matches_torch_fp32(repository, encoder, slide_tiles, precision):
    runtime = select_encoder_runtime(repository, "torch", precision).runtime
    assert runtime.description == f"torch {precision} on cuda"
    _assert_matches_torch_fp32(runtime, encoder, slide_tiles)
    _assert_matches_torch_fp32(runtime, encoder, _random_tiles(5))


def test_onnxruntime_gpu_providers_match_torch_fp32(repository, encoder, slide_tiles):
    import onnxruntime

    if not CUDA or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip(
            "onnxruntime has no CUDA execution provider here (onnxruntime-gpu is not installed, or there is no GPU), "
            "so onnxruntime on the GPU was not run"
        )
    runtime = select_encoder_runtime(repository, "onnxruntime", "fp32").runtime
    assert "CUDAExecutionProvider" in runtime.description
    _assert_matches_torch_fp32(runtime, encoder, slide_tiles)


def test_tensorrt_runtime_refuses_clearly_without_tensorrt(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: its absence cannot be shown here")
    with pytest.raises(TensorRTUnavailableError, match="TensorRT cannot be imported") as caught:
        TensorRTTileEncoder(tmp_path / "model.plan", 224, 192)
    assert 'pip install "tensorrt>=10,<11"' in str(caught.value)
    assert isinstance(caught.value, XmagError)


@pytest.fixture(scope="module")
def tensorrt_repository(tmp_path_factory, encoder):
    if not CUDA:
        pytest.skip(f"{NO_CUDA}; the TensorRT engine was not built or run")
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT is not installed here, so the TensorRT engine was not built or run")
    options = ExportOptions(tensorrt=True, tensorrt_min_batch=1, tensorrt_opt_batch=8, tensorrt_max_batch=16)
    return _export(tmp_path_factory.mktemp("tensorrt"), encoder, options)


def test_tensorrt_engine_matches_torch_fp32_within_its_profile(tensorrt_repository, encoder, slide_tiles):
    runtime = select_encoder_runtime(tensorrt_repository, "tensorrt").runtime
    assert isinstance(runtime, TensorRTTileEncoder) and runtime.description == "tensorrt fp16 on cuda"
    assert (runtime.min_batch_size, runtime.max_batch_size) == (1, 16)
    _assert_matches_torch_fp32(runtime, encoder, slide_tiles)
    _assert_matches_torch_fp32(runtime, encoder, _random_tiles(7))  # an odd size inside the profile
    with pytest.raises(TensorRTBatchSizeError, match=r"17 tiles is outside .* 1 to 16 tiles"):
        runtime.encode(_random_tiles(17))
    measured = select_encoder_runtime(tensorrt_repository).measurements
    assert next(m for m in measured if m.backend == "tensorrt").tiles_per_s is not None


def test_a_repository_without_torch_weights_still_runs(repository):
    # As exported before torch weights were added: the fp32 ONNX graph, which the export
    # verified against torch fp32, is then the reference.
    older = dataclasses.replace(
        repository,
        manifest=repository.manifest.model_copy(
            update={"artifacts": [a for a in repository.manifest.artifacts if a.runtime != "torch"]}
        ),
    )
    selection = select_encoder_runtime(older)
    assert selection.runtime.backend == "onnxruntime"
    torch_measurements = [m for m in selection.measurements if m.backend == "torch"]
    assert torch_measurements and all(m.tiles_per_s is None for m in torch_measurements)
    assert "holds no torch weights" in next(m.note for m in torch_measurements if m.precision == "fp32")
    onnx_fp32 = next(m for m in selection.measurements if m.description.startswith("onnxruntime fp32"))
    assert onnx_fp32.min_cosine_vs_torch_fp32 > 0.99999
