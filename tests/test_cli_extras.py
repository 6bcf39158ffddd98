"""The core's commands run without the faces' libraries; a face's command without its extra says which to install.

Each case runs the real `xmag` command in a child process in which the named
libraries cannot be imported, as in an environment without them. The closing note of the house
issue records the same checks in a fresh virtual environment with `pip install .`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_support import xmag_without

from xmag.cli.app import EXTRA_OF_MODULE
from xmag.models.abmil import GatedABMIL, SlideHeads
from xmag.models.checkpoints.xmag_format import save_encoder_checkpoint
from xmag.models.encoder import build_tile_encoder

EVERY_FACE_LIBRARY = sorted(EXTRA_OF_MODULE)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    encoder = build_tile_encoder("tiny_dinov2", seed=0)
    heads = SlideHeads({"tumour": GatedABMIL(in_dim=encoder.embed_dim, num_classes=2)}, {"tumour": ["no", "yes"]})
    save_encoder_checkpoint(encoder.vit, path, heads=heads)
    return path


def test_info_runs_without_any_face_library(slide_20x):
    completed = xmag_without(EVERY_FACE_LIBRARY, "info", str(slide_20x.path))
    assert completed.returncode == 0, completed.stderr
    assert '"mpp": 0.5' in completed.stdout


def test_classify_with_weights_runs_without_any_face_library(slide_20x, tiny_checkpoint, tmp_path):
    completed = xmag_without(
        EVERY_FACE_LIBRARY, "classify", str(slide_20x.path), "--weights", str(tiny_checkpoint), "--out", str(tmp_path)
    )
    assert completed.returncode == 0, completed.stderr
    assert "tumour:" in completed.stdout
    assert (tmp_path / f"{slide_20x.path.stem}.result.json").is_file()


@pytest.mark.parametrize(
    ("absent", "arguments", "extra"),
    [
        (["fastapi"], ["serve", "--model-repo", "."], "serve"),
        (["grpc"], ["lis-client", "."], "serve"),
        (["onnx", "onnxscript"], ["export", "CHECKPOINT", "--repo", "REPO"], "export"),
        (["matplotlib"], ["bench", "--quick", "--out", "REPO"], "bench"),
        # Without a repository, serve builds the demo one, which takes the export stage.
        (["onnx", "onnxscript"], ["serve", "--slide-root", "."], "export"),
    ],
)
def test_a_command_without_its_extra_names_the_extra(absent, arguments, extra, tiny_checkpoint, tmp_path):
    arguments = [
        str(tiny_checkpoint) if a == "CHECKPOINT" else str(tmp_path / "repo") if a == "REPO" else a for a in arguments
    ]
    completed = xmag_without(absent, *arguments, cwd=tmp_path)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert f"needs the [{extra}] extra" in completed.stderr and f"pip install 'xmag[{extra}]'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_the_triton_backend_without_tritonclient_names_the_extra():
    probe = (
        "import sys; sys.modules['tritonclient'] = None\n"
        "from xmag.runtimes.protocols import EncoderBackendUnavailableError\n"
        "from xmag.runtimes.triton_backend import TritonTileEncoder\n"
        "try:\n"
        "    TritonTileEncoder('127.0.0.1:9', 'encoder', 224, 768, timeout_s=1)\n"
        "except EncoderBackendUnavailableError as error:\n"
        "    print(error)\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "pip install 'xmag[serve]'" in completed.stdout
