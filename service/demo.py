"""The main job's last steps: serve the demo repository, classify the demo slide over REST, keep the heatmaps.

It runs `xmag serve` as a child process on a free loopback port, exactly as an
operator would, talks to it only through HTTP, and stops it with SIGTERM (a
graceful shutdown) at the end.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from xmag.result_files import write_result_json
from xmag.result_schema import ClassifyResult
from xmag.service.errors import DemoError


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(
    model_repo: Path, slide_root: Path, port: int, ready_timeout_s: float, say: Callable[[str], None]
) -> Iterator[str]:
    """`xmag serve` on loopback with the model repository; yields its base URL once /readyz is 200."""
    command = [
        sys.executable,
        "-m",
        "xmag.cli",
        "serve",
        "--model-repo",
        str(model_repo),
        "--port",
        str(port),
        "--grpc-port",
        str(free_loopback_port()),
        "--slide-root",
        str(slide_root),
        "--log-level",
        "warning",
    ]
    say("$ " + " ".join(["xmag", *command[3:]]))
    server = subprocess.Popen(command)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if server.poll() is not None:
                raise DemoError(f"the service exited with status {server.returncode} before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise DemoError(f"the service was not ready within {ready_timeout_s:.0f} s")
            time.sleep(0.2)
        yield base_url
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def classify_demo_slide(base_url: str, slide_path: Path, output_dir: Path, say: Callable[[str], None]) -> list[Path]:
    """POST the slide, print the answer, fetch each task's heatmap PNG and GeoJSON; returns the files written."""
    body = {"slide_path": str(slide_path), "heatmap": True, "return_attention": True}
    say(f"$ curl -s -X POST {base_url}/v1/classify -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
    response = httpx.post(f"{base_url}/v1/classify", json=body, timeout=600)
    answer = response.json()
    if response.status_code != 200:
        raise DemoError(f"POST /v1/classify answered {response.status_code}: {answer}")
    shown = {key: value for key, value in answer.items() if key != "attention"}
    say(json.dumps(shown, indent=2))
    say(f"(attention: {len(answer['attention']['level0_coords'])} tiles, left out above; it is in the result file)")
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = slide_path.stem
    written = []
    for task, links in answer["heatmaps"].items():
        for url, suffix in ((links["png_url"], "heatmap.png"), (links["geojson_url"], "attention.geojson")):
            fetched = httpx.get(url, timeout=60)
            fetched.raise_for_status()
            path = output_dir / f"{stem}.{task}.{suffix}"
            path.write_bytes(fetched.content)
            written.append(path)
    # The same schema `xmag classify` writes; validating it here keeps the two result files alike.
    written.append(write_result_json(ClassifyResult.model_validate(answer), output_dir / f"{stem}.result.json"))
    return written


def run_demo(
    output_dir: Path, model_repo: Path, say: Callable[[str], None], ready_timeout_s: float = 600
) -> list[Path]:
    """Generate the demo slide, serve `model_repo`, classify the slide over REST; returns the files written."""
    from xmag.demo import ensure_demo_slide

    slide = ensure_demo_slide(output_dir / "demo")
    say(f"demo slide: {slide.path} (generated; 20x, one planted lesion; not in the training cohort)")
    slide_root = slide.path.parent.resolve()
    with serving(model_repo.resolve(), slide_root, free_loopback_port(), ready_timeout_s, say) as base_url:
        return classify_demo_slide(base_url, slide.path.resolve(), output_dir, say)
