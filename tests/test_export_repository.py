"""Export: ONNX parity, import of official formats, and a model repository verified on load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime
import pytest
import torch
from _reference import key_list, load_fixture

from xmag.export import onnx_export
from xmag.export.import_weights import import_weights
from xmag.export.repository import ExportOptions, export_model_repository
from xmag.model_repo import ModelRepositoryError, load_model_repository
from xmag.models.abmil import SlideHeads
from xmag.models.checkpoints.xmag_format import (
    load_encoder_checkpoint,
    load_slide_heads,
    load_xmag_checkpoint,
    save_encoder_checkpoint,
)
from xmag.models.encoder import build_tile_encoder
from xmag.models.vit import get_vit_config
from xmag.runtimes.selection import runtimes_from_repository


def _checkpoint(path, seed=0, provenance="untrained-demo"):
    encoder = build_tile_encoder("tiny_dinov2", seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = SlideHeads.from_class_names(
            {"tumour": ["benign", "malignant"], "subtype": ["a", "b", "c"]}, in_dim=encoder.embed_dim
        ).eval()
    save_encoder_checkpoint(encoder.vit, path, heads=heads, metadata={"provenance_kind": provenance})
    return encoder, heads


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    encoder, heads = _checkpoint(root / "tiny.safetensors")
    manifest = export_model_repository(root / "tiny.safetensors", root / "repo", ExportOptions(int8=True))
    return root, encoder, heads, manifest


def test_encoder_onnx_matches_torch_at_batch_1_and_7(exported):
    root, encoder, _, manifest = exported
    session = onnxruntime.InferenceSession(
        str(root / "repo/tiny_dinov2/1/model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [i.type for i in session.get_inputs()] == ["tensor(uint8)"]
    rng = np.random.default_rng(1)
    for batch in (1, 7):
        tiles = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
        expected = encoder(torch.from_numpy(tiles)).detach().numpy()
        (actual,) = session.run(None, {"tiles": tiles})
        assert np.abs(actual - expected).max() <= onnx_export.FP32_MAX_ABS_ERROR
        cosine = (actual * expected).sum(1) / np.linalg.norm(actual, axis=1) / np.linalg.norm(expected, axis=1)
        assert cosine.min() >= 0.9999
    recorded = manifest.artifact("tiny_dinov2").parity
    assert recorded.batch_sizes == [1, 7] and recorded.max_abs_error <= onnx_export.FP32_MAX_ABS_ERROR


def test_head_onnx_matches_torch_at_1_and_1000_tiles(exported):
    root, _, heads, manifest = exported
    session = onnxruntime.InferenceSession(
        str(root / "repo/tiny_dinov2_head_subtype/1/model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(2)
    for tiles in (1, 1000):
        features = rng.standard_normal((tiles, 192)).astype(np.float32)
        logits, attention = heads.heads["subtype"](torch.from_numpy(features))
        probabilities, onnx_attention = session.run(["probabilities", "attention"], {"features": features})
        np.testing.assert_allclose(probabilities, torch.softmax(logits, -1).detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(onnx_attention, attention.detach().numpy(), atol=1e-6)
        assert onnx_attention.shape == (tiles,)
    assert manifest.artifact("tiny_dinov2_head_subtype").parity.batch_sizes == [1, 1000]


def test_manifest_records_what_a_service_needs(exported):
    root, _, _, manifest = exported
    saved = json.loads((root / "repo/manifest.json").read_text())
    assert saved["provenance"]["kind"] == "untrained-demo"
    assert len(saved["provenance"]["source_sha256"]) == 64
    assert {t["name"]: t["class_names"] for t in saved["tasks"]} == {
        "tumour": ["benign", "malignant"],
        "subtype": ["a", "b", "c"],
    }
    assert saved["encoder"]["tile_size_px"] == 224 and saved["encoder"]["target_mpp"] == 2.0
    assert saved["encoder"]["normalisation"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert {"torch", "onnx", "onnxruntime"} <= set(saved["exporter_versions"])
    for artifact in saved["artifacts"]:
        if artifact["runtime"] == "torch":
            # Torch weights are no Triton model: one file at the root, beside the manifest.
            assert [f["path"] for f in artifact["files"]] == [f"{artifact['name']}.safetensors"]
        else:
            assert {f["path"].split("/")[-1] for f in artifact["files"]} >= {"config.pbtxt", "model.onnx"}
        assert all(len(f["sha256"]) == 64 for f in artifact["files"])
    assert {(a["name"], a["runtime"], a["precision"]) for a in saved["artifacts"] if a["role"] == "encoder"} == {
        ("tiny_dinov2_torch", "torch", "fp32"),
        ("tiny_dinov2", "onnxruntime", "fp32"),
        ("tiny_dinov2_int8", "onnxruntime", "int8"),
    }
    int8 = manifest.artifact("tiny_dinov2_int8")
    assert int8.precision == "int8"
    assert int8.usable == (int8.parity.min_cosine >= onnx_export.INT8_MIN_COSINE)


def test_repository_verifies_and_runs(exported, slide_20x):
    from xmag.pipeline import classify_slide

    root, _, _, _ = exported
    repository = load_model_repository(root / "repo", expected_model_name="tiny_dinov2")
    encoder, heads = runtimes_from_repository(repository)
    assert encoder.backend in ("torch", "onnxruntime")  # whichever measured fastest here
    result = classify_slide(str(slide_20x.path), encoder, heads)
    assert set(result.predictions) == {"tumour", "subtype"}


def test_repository_is_readable_by_other_users(exported):
    # The service and Triton run as their own users on a copy of the repository in a volume.
    repo = exported[0] / "repo"
    modes = {path.relative_to(repo).as_posix(): path.stat().st_mode & 0o777 for path in [repo, *repo.rglob("*")]}
    assert modes["."] == 0o755
    assert all(mode == (0o755 if (repo / name).is_dir() else 0o644) for name, mode in modes.items()), modes


@pytest.fixture
def repo_copy(exported, tmp_path):
    root = exported[0]
    copy = tmp_path / "repo"
    shutil.copytree(root / "repo", copy)
    return copy


def test_tampered_artifact_is_refused(repo_copy):
    model = repo_copy / "tiny_dinov2/1/model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    model.write_bytes(bytes(data))
    with pytest.raises(ModelRepositoryError, match=r"tiny_dinov2/1/model\.onnx .* does not match its manifest"):
        load_model_repository(repo_copy)


def test_missing_file_is_refused(repo_copy):
    (repo_copy / "tiny_dinov2_head_tumour/config.pbtxt").unlink()
    with pytest.raises(ModelRepositoryError, match=r"lacks tiny_dinov2_head_tumour/config\.pbtxt"):
        load_model_repository(repo_copy)


def test_missing_manifest_is_refused(repo_copy):
    (repo_copy / "manifest.json").unlink()
    with pytest.raises(ModelRepositoryError, match=r"no manifest\.json"):
        load_model_repository(repo_copy)


def test_manifest_of_another_model_is_refused(repo_copy, tmp_path):
    # Same architecture, other weights: the manifest lists files that are not these.
    _checkpoint(tmp_path / "other.safetensors", seed=5)
    export_model_repository(tmp_path / "other.safetensors", tmp_path / "other", ExportOptions())
    shutil.copy(tmp_path / "other/manifest.json", repo_copy / "manifest.json")
    with pytest.raises(ModelRepositoryError, match="does not match its manifest"):
        load_model_repository(repo_copy)
    # Another model name altogether.
    with pytest.raises(ModelRepositoryError, match="holds model 'tiny_dinov2', not the expected 'xmag_vitb14'"):
        load_model_repository(tmp_path / "other", expected_model_name="xmag_vitb14")


def test_renamed_manifest_model_is_refused(repo_copy):
    manifest = json.loads((repo_copy / "manifest.json").read_text())
    manifest["model_name"] = "uni2h"
    (repo_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelRepositoryError, match="belongs to another model"):
        load_model_repository(repo_copy)


def test_interrupted_export_leaves_the_old_repository(exported, tmp_path, monkeypatch):
    root = exported[0]
    target = tmp_path / "repo"
    shutil.copytree(root / "repo", target)

    def fail(*args, **kwargs):
        raise onnx_export.ParityError("simulated parity failure")

    monkeypatch.setattr(onnx_export, "check_fp32_parity", fail)
    with pytest.raises(onnx_export.ParityError):
        export_model_repository(root / "tiny.safetensors", target, ExportOptions())
    load_model_repository(target)  # still complete and verified
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]


def test_tensorrt_export_refuses_before_any_work_without_tensorrt(exported, tmp_path):
    import importlib.util

    from xmag.runtimes.tensorrt_backend import TensorRTUnavailableError

    if importlib.util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed: the refusal cannot be shown here")
    with pytest.raises(TensorRTUnavailableError, match="TensorRT cannot be imported"):
        export_model_repository(exported[0] / "tiny.safetensors", tmp_path / "repo", ExportOptions(tensorrt=True))
    assert list(tmp_path.iterdir()) == []


def _random_state_dict(entries, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {key: 0.02 * torch.randn(shape, generator=generator) for key, shape in entries}


def _assert_imported(output, source, expected_format, used_format, architecture):
    assert used_format == expected_format
    checkpoint = load_xmag_checkpoint(output)
    metadata = checkpoint.metadata
    assert metadata["source_format"] == expected_format
    assert metadata["source_checkpoint"] == source.name
    assert len(metadata["source_sha256"]) == 64
    assert checkpoint.vit.config == get_vit_config(architecture)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "state_dict-wrapped"])
def test_import_xmag_release(tmp_path, wrapped):
    student = _random_state_dict(key_list("dinov2_vitb14_keys.json"))
    release = {f"model.{key}": value for key, value in student.items()}
    release["global_head.0.weight"] = torch.zeros(1536, 768)  # distillation heads are dropped
    source = tmp_path / "xmag_release.pth"
    torch.save({"state_dict": release, "epoch": 3} if wrapped else release, source)
    used = import_weights(source, tmp_path / "xmag.safetensors")
    _assert_imported(tmp_path / "xmag.safetensors", source, "xmag_release", used, "xmag_vitb14")


def test_import_dinov2_hub(tmp_path):
    source = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(_random_state_dict(key_list("dinov2_vitb14_keys.json")), source)
    used = import_weights(source, tmp_path / "student.safetensors")
    _assert_imported(tmp_path / "student.safetensors", source, "dinov2_hub", used, "xmag_vitb14")


def test_import_uni2h_timm_reproduces_the_reference(tmp_path):
    # The UNI2-h recipe at the fixture's size; full-size UNI2-h keys are checked in test_models_checkpoints.
    state_dict, others = load_fixture("uni2h_small_timm.safetensors")
    source = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, source)
    used = import_weights(source, tmp_path / "uni2h.safetensors", architecture="tiny_uni2h")
    _assert_imported(tmp_path / "uni2h.safetensors", source, "timm", used, "tiny_uni2h")
    vit = load_encoder_checkpoint(tmp_path / "uni2h.safetensors")
    with torch.no_grad():
        assert (vit(others["input"]) - others["out.forward"]).abs().max() < 1e-5


def test_import_phikon_hf_vit(tmp_path):
    import transformers

    reference = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            image_size=224,
            patch_size=16,
            layer_norm_eps=1e-12,
        ),
        add_pooling_layer=False,
    )
    source = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(source))
    used = import_weights(source, tmp_path / "phikon.safetensors")
    _assert_imported(tmp_path / "phikon.safetensors", source, "hf_vit", used, "phikon_vitb16")


def test_import_wrong_weights_names_the_keys(tmp_path):
    from xmag.errors import CheckpointError

    source = tmp_path / "vit_base_patch14_dinov2.bin"
    torch.save(_random_state_dict(key_list("timm_vit_base_patch14_dinov2_224_keys.json")), source)
    # Phikon is a ViT-B/16 without LayerScale: patch size and position grid differ, ls keys are extra.
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ls1\.gamma(.|\n)*patch_embed\.proj\.weight"):
        import_weights(source, tmp_path / "out.safetensors", architecture="phikon_vitb16")
    assert not (tmp_path / "out.safetensors").exists()


def test_heads_travel_with_the_checkpoint(tmp_path):
    _encoder, heads = _checkpoint(tmp_path / "with_heads.safetensors")
    restored = load_slide_heads(tmp_path / "with_heads.safetensors")
    features = torch.randn(9, 192)
    for task in heads.class_names:
        expected, actual = heads.heads[task](features), restored.heads[task](features)
        assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
    assert restored.class_names == heads.class_names
