"""The embedding cache's effect, measured end to end: `xmag serve` with a cache, one slide posted repeatedly.

The first request encodes the slide; the later ones find its embeddings in the
cache and run only the heads. It talks to the service over HTTP only (the
standard library's client), as a caller would, and writes
`embedding_cache.json` with every request's time and the ratio of the first
to the median of the later ones. Extraction throughput (`extraction_throughput`)
is measured in-process on the same slide: tiles/s, slides/min and the feature
file's bytes per slide.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from xmag.errors import XmagError


class CacheBenchmarkError(XmagError):
    """The service under measurement did not start or did not answer."""

    code = "cache_benchmark_failed"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict, timeout_s: float) -> tuple[float, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - started, answer


def run_cache_benchmark(
    slide: Path, model_repo: Path | None, output_dir: Path, repeats: int = 5, say: Callable[[str], None] = print
) -> dict:
    """Serve with an empty embedding cache, post `slide` 1 + `repeats` times; returns and writes the timings."""
    output_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="xmag-cache-bench-") as cache_dir:
        command = [
            sys.executable,
            "-m",
            "xmag.cli",
            "serve",
            "--port",
            str(port),
            "--no-grpc",
            "--log-level",
            "warning",
        ]
        command += ["--slide-root", str(slide.parent.resolve()), "--embedding-cache-dir", cache_dir]
        command += ["--model-repo", str(model_repo)] if model_repo is not None else []
        server = subprocess.Popen(command)
        try:
            deadline = time.monotonic() + 900
            while True:
                if server.poll() is not None:
                    raise CacheBenchmarkError(f"the service exited with status {server.returncode} before it was ready")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise CacheBenchmarkError("the service was not ready within 900 s") from None
                    time.sleep(0.5)
            url, body = f"http://127.0.0.1:{port}/v1/classify", {"slide_path": str(slide.resolve())}
            seconds = [_post(url, body, 900)[0] for _ in range(1 + repeats)]
            _, answer = _post(url, body, 900)
        finally:
            server.terminate()
            server.wait(timeout=120)
    uncached, cached = seconds[0], statistics.median(seconds[1:])
    report = {
        "slide": slide.name,
        "tiles": answer["slide"]["tile_count"],
        "encoder": answer["model"]["encoder"],
        "request_seconds": seconds,
        "uncached_s": uncached,
        "cached_median_s": cached,
        "ratio": uncached / cached,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (output_dir / "embedding_cache.json").write_text(json.dumps(report, indent=1) + "\n")
    say(
        f"embedding cache: first request {uncached:.2f} s, repeats {cached:.3f} s (median of {repeats}): "
        f"{report['ratio']:.1f}x faster on {report['tiles']} tiles ({report['encoder']})"
    )
    return report


def extraction_throughput(
    slides: list[Path], model_repo: Path, output_dir: Path, say: Callable[[str], None] = print
) -> dict:
    """Feature extraction as `xmag extract` does it (embed_slide, then one feature file per slide), timed."""
    from xmag.features import EncoderIdentity, write_feature_file
    from xmag.loading import load_repository_model
    from xmag.pipeline import embed_slide

    model = load_repository_model(model_repo)
    info = model.info
    identity = EncoderIdentity.of_model(info)
    started, tiles, file_bytes = time.perf_counter(), 0, []
    with tempfile.TemporaryDirectory(prefix="xmag-extract-bench-") as folder:
        for slide in slides:
            embedded = embed_slide(str(slide), model.encoder, spec=model.spec, batch_size=16)
            path = write_feature_file(Path(folder) / f"{slide.stem}.h5", embedded, identity)
            tiles += len(embedded.embeddings)
            file_bytes.append(path.stat().st_size)
    seconds = time.perf_counter() - started
    report = {
        "slides": len(slides),
        "tiles": tiles,
        "encoder": info.encoder,
        "seconds": seconds,
        "tiles_per_second": tiles / seconds,
        "slides_per_minute": 60 * len(slides) / seconds,
        "feature_file_bytes_per_slide": statistics.mean(file_bytes),
    }
    (output_dir / "extraction.json").write_text(json.dumps(report, indent=1) + "\n")
    say(
        f"extraction: {report['tiles_per_second']:.1f} tiles/s, {report['slides_per_minute']:.2f} slides/min, "
        f"{report['feature_file_bytes_per_slide'] / 1024:.0f} KiB per feature file ({tiles} tiles, {info.encoder})"
    )
    return report
