"""A real Triton Inference Server for the tests: the one bundled in nvidia-pytriton, on loopback.

pytriton needs numpy<2, so it lives in its own virtualenv, whose interpreter
`XMAG_TRITON_PYTHON` names (`make test` creates `.venv-triton` and sets it).
Its Triton 2.51 has only the Python backend, so each exported model is served
through `triton_stand_in/model.py`, which runs the exported `model.onnx` with
onnxruntime on the CPU. The server is launched the way pytriton launches it
(pytriton/triton.py and pytriton/server/triton_server.py in the wheel):

- the Python backend's stub for the interpreter's version is copied into a
  copy of the bundled backend directory, as `backends/python/triton_python_backend_stub`;
- LD_LIBRARY_PATH holds the interpreter's libpython directory (sysconfig LIBDIR;
  otherwise the stub loads the system's libpython, if there is one) and the
  wheel's `nvidia_pytriton.libs` (the copied backend's RPATH no longer reaches it);
- PATH starts with the virtualenv's `bin`: the stub's embedded Python finds its
  `python3` there, and through it the virtualenv's site-packages (numpy, onnxruntime);
- `--backend-config=python,shm-region-prefix-name=<unique>`, so that servers
  running at the same time do not share shared-memory regions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from xmag.service.demo import free_loopback_port

TRITON_PYTHON_ENV = "XMAG_TRITON_PYTHON"
STAND_IN_MODEL = Path(__file__).parent / "triton_stand_in" / "model.py"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_CHARS = 4000

# What the stand-in's config.pbtxt changes in the exported one; everything else is kept as exported.
_EXPORTED_PLATFORM = 'platform: "onnxruntime_onnx"'
_STAND_IN_BACKEND = 'backend: "python"'


def triton_python() -> Path:
    """The interpreter of the virtualenv holding nvidia-pytriton; fails the test when there is none."""
    value = os.environ.get(TRITON_PYTHON_ENV)
    if not value or not Path(value).is_file():
        pytest.fail(
            f"{TRITON_PYTHON_ENV} is {'unset' if not value else f'{value!r}, which does not exist'}, so the "
            "Triton backend cannot be tested against a real Triton server. `make test` creates .venv-triton "
            f'(pip install "nvidia-pytriton==0.7.0" "numpy<2" onnxruntime) and sets {TRITON_PYTHON_ENV} to its bin/python.'
        )
    return Path(value)


@dataclass(frozen=True)
class TritonInstall:
    """Where the parts of pytriton's bundled Triton are, for one interpreter."""

    python: Path
    server_binary: Path
    backends: Path  # the bundled backend directory, without the Python backend's stub
    stub: Path  # the Python backend's stub built for this interpreter's version
    library_dirs: tuple[Path, ...]  # for LD_LIBRARY_PATH
    bin_dir: Path  # the virtualenv's bin, for PATH

    @classmethod
    def of(cls, python: Path) -> TritonInstall:
        """Ask `python` where pytriton and its libpython are."""
        probe = (
            "import importlib.util, json, sys, sysconfig; "
            "spec = importlib.util.find_spec('pytriton'); "
            "print(json.dumps({'pytriton': spec and spec.submodule_search_locations[0], "
            "'libdir': sysconfig.get_config_var('LIBDIR'), 'exec_prefix': sys.exec_prefix, "
            "'version': f'{sys.version_info[0]}.{sys.version_info[1]}'}))"
        )
        found = json.loads(
            subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout
        )
        if not found["pytriton"]:
            pytest.fail(f"{python} has no nvidia-pytriton; `make test` installs it into .venv-triton")
        pytriton = Path(found["pytriton"])
        server = pytriton / "tritonserver"
        install = cls(
            python=python,
            server_binary=server / "bin" / "tritonserver",
            backends=server / "backends",
            stub=server / "python_backend_stubs" / found["version"] / "triton_python_backend_stub",
            # pytriton's get_libs_path: the wheel's bundled libraries lie beside the package.
            library_dirs=(
                Path(found["libdir"]),
                pytriton.parent / "nvidia_pytriton.libs",
            ),
            bin_dir=Path(found["exec_prefix"]) / "bin",
        )
        missing = [str(path) for path in (install.server_binary, install.backends, install.stub) if not path.exists()]
        if missing:
            pytest.fail(f"the nvidia-pytriton of {python} lacks {missing}; reinstall it (`make clean test`)")
        return install


def add_stand_in_model(
    triton_repository: Path,
    exported_repository: Path,
    model_name: str,
    served_as: str | None = None,
) -> None:
    """Put an exported model into a Triton repository, served by the Python-backend stand-in.

    Its config.pbtxt is the exported one with `backend: "python"` for the
    onnxruntime platform and its instances on the CPU (the stand-in runs
    onnxruntime on the CPU); name (or `served_as`), tensors, max_batch_size and
    dynamic batching are kept. Each version directory gets its `model.onnx`
    and the stand-in's `model.py`.
    """
    source = exported_repository / model_name
    target = triton_repository / (served_as or model_name)
    config = (source / "config.pbtxt").read_text()
    replacements = [
        (_EXPORTED_PLATFORM, _STAND_IN_BACKEND),
        ("kind: KIND_GPU", "kind: KIND_CPU"),
    ]
    if served_as:
        replacements.append((f'name: "{model_name}"', f'name: "{served_as}"'))
    for old, new in replacements:
        if old in config:
            config = config.replace(old, new)
        elif old == _EXPORTED_PLATFORM or old.startswith("name:"):
            raise ValueError(f"{source / 'config.pbtxt'} has no line {old!r}: the export's format changed")
    target.mkdir(parents=True)
    (target / "config.pbtxt").write_text(config)
    for version in (path for path in source.iterdir() if path.is_dir()):
        (target / version.name).mkdir()
        shutil.copy(version / "model.onnx", target / version.name / "model.onnx")
        shutil.copy(STAND_IN_MODEL, target / version.name / "model.py")


class TritonServer:
    """A tritonserver process serving `model_repository` on free loopback ports; a context manager.

    Entering starts it and waits (up to READY_TIMEOUT_S) until every model is
    ready; leaving stops it, by SIGTERM and, past STOP_TIMEOUT_S, SIGKILL to its
    process group (its Python-backend stubs included). Its output goes to
    `log_path`; failures quote the log's tail.
    """

    def __init__(self, install: TritonInstall, model_repository: Path, work_dir: Path):
        self.install = install
        self.model_repository = model_repository
        self.work_dir = work_dir
        self.log_path = work_dir / "tritonserver.log"
        self.grpc_port, self.http_port, self.metrics_port = (
            free_loopback_port(),
            free_loopback_port(),
            free_loopback_port(),
        )
        self.url = f"127.0.0.1:{self.grpc_port}"  # what the encoder backend is given: Triton's gRPC endpoint
        self.shm_prefix = f"xmag-test-{uuid.uuid4().hex[:8]}-"
        self.start_s: float | None = None  # from launch to every model ready
        self.stop_s: float | None = None
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> TritonServer:  # noqa: PYI034 - tests/ does not use typing_extensions
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def command(self, backends: Path) -> list[str]:
        return [
            str(self.install.server_binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(
            [
                *map(str, self.install.library_dirs),
                *filter(None, [os.environ.get("LD_LIBRARY_PATH")]),
            ]
        )
        env["PATH"] = f"{self.install.bin_dir}:{os.environ.get('PATH', '')}"
        return env

    def start(self) -> None:
        """Launch the server and wait until it and every model are ready; pytest.fail with its log otherwise."""
        # pytriton's layout: the bundled backends, with the stub for this interpreter inside the Python backend.
        backends = self.work_dir / "backends"
        shutil.copytree(self.install.backends, backends)
        shutil.copy(self.install.stub, backends / "python" / "triton_python_backend_stub")
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            # A session of its own, so stopping it reaches the stubs it starts too.
            self._process = subprocess.Popen(
                self.command(backends),
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self.stop()
                pytest.fail(
                    f"tritonserver exited with status {self._process.returncode} while loading:\n{self.log_tail()}"
                )
            if self.ready():
                self.start_s = time.monotonic() - started
                return
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"tritonserver was not ready within {READY_TIMEOUT_S:g} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """Whether the server answers that it and every model are ready (Triton's HTTP health endpoint)."""
        try:
            return httpx.get(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def pause(self) -> None:
        """Stop the server process where it is (SIGSTOP): it keeps its connections but answers nothing."""
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """End the server and its stubs at once (SIGKILL), as a crash would."""
        # Sent while the server is not yet reaped, so its pid, which is the group's id, cannot have been reused.
        os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait()

    def stop(self) -> None:
        """Stop the server gracefully, or kill it past STOP_TIMEOUT_S; then its stubs and shared memory."""
        if self._process is None:
            return
        started = time.monotonic()
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self._process.terminate()  # Triton unloads its models, which ends their stubs, and exits
            try:
                self._process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self.stop_s = time.monotonic() - started
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        return text[-LOG_TAIL_CHARS:]
