"""The service's embedding cache on a real uvicorn: a repeat runs only the heads; a changed slide is encoded again."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil

import h5py
import httpx
import pytest
from service_support import metric_value, running_service, service_settings

from xmag.features import EncoderIdentity, read_feature_file
from xmag.models.encoder import build_tile_encoder
from xmag.pipeline import embed_slide
from xmag.runtimes.torch_backend import TorchTileEncoder
from xmag.service.embedding_cache import EmbeddingCache, slide_fingerprint
from xmag.service.metrics import ServiceMetrics
from xmag.service.rest import create_app
from xmag.slide.tiling import XMAG_5X


@pytest.fixture
def cached_service(lesion_model, tmp_path):
    slides = lesion_model.slides_dir / f"cache_{tmp_path.name}"
    slides.mkdir()
    settings = service_settings(
        model_repo=lesion_model.repository,
        slide_roots=[slides],
        read_batch_size=8,
        embedding_cache_dir=tmp_path / "cache",
    )
    with running_service(create_app(settings)) as base_url:
        yield base_url, slides, tmp_path / "cache"


def _classify(base_url, path) -> dict:
    answer = httpx.post(f"{base_url}/v1/classify", json={"slide_path": str(path)}, timeout=300)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _counters(base_url) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics").text
    counters = {
        result: metric_value(text, "xmag_embedding_cache_lookups_total", f'result="{result}"')
        for result in ("hit", "miss", "corrupt")
    }
    counters["tiles"] = metric_value(text, "xmag_tiles_encoded_total")
    counters["bytes"] = metric_value(text, "xmag_embedding_cache_bytes")
    return counters


def _lookups(counters) -> tuple[float, float, float]:
    return counters["hit"], counters["miss"], counters["corrupt"]


def test_a_repeat_request_runs_only_the_heads(cached_service, lesion_model):
    base_url, slides, cache = cached_service
    slide = slides / "lesion.svs"
    shutil.copy(lesion_model.lesion_slide.path, slide)
    first = _classify(base_url, slide)
    after_first = _counters(base_url)
    tiles = first["slide"]["tile_count"]
    assert after_first["tiles"] == tiles and _lookups(after_first) == (0, 1, 0)
    (entry,) = cache.glob("*.h5")
    assert read_feature_file(entry).features.shape[0] == tiles and after_first["bytes"] == entry.stat().st_size
    second = _classify(base_url, slide)
    after_second = _counters(base_url)
    assert after_second["tiles"] == tiles, "the encoder ran again on a cached slide"
    assert _lookups(after_second) == (1, 1, 0)
    assert second["predictions"] == first["predictions"]
    assert second["timings_s"]["encode"] == 0 and second["timings_s"]["read"] == 0
    print(f"uncached {first['timings_s']['total']:.2f} s, cached {second['timings_s']['total']:.2f} s")


def test_a_replaced_slide_is_not_served_from_the_cache(cached_service, lesion_model):
    base_url, slides, _ = cached_service
    slide = slides / "case.svs"
    shutil.copy(lesion_model.lesion_slide.path, slide)
    before = slide_fingerprint(slide)
    lesion = _classify(base_url, slide)
    shutil.copy(lesion_model.normal_slide.path, slide)  # another slide under the same path
    assert slide_fingerprint(slide) != before
    normal = _classify(base_url, slide)
    counters = _counters(base_url)
    assert _lookups(counters) == (0, 2, 0)
    assert counters["tiles"] == lesion["slide"]["tile_count"] + normal["slide"]["tile_count"]
    assert normal["predictions"]["lesion"]["label"] == "normal" and lesion["predictions"]["lesion"]["label"] == "lesion"


def test_a_corrupt_entry_is_encoded_again_and_rewritten(cached_service, lesion_model):
    base_url, slides, cache = cached_service
    slide = slides / "slide.svs"
    shutil.copy(lesion_model.normal_slide.path, slide)
    first = _classify(base_url, slide)
    (entry,) = cache.glob("*.h5")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # half a file
    second = _classify(base_url, slide)
    counters = _counters(base_url)
    assert _lookups(counters) == (0, 1, 1)
    assert counters["tiles"] == 2 * first["slide"]["tile_count"]
    assert second["predictions"] == first["predictions"]
    with h5py.File(entry, "r") as rewritten:
        assert len(rewritten["features"]) == first["slide"]["tile_count"]


def test_concurrent_requests_for_one_slide_encode_it_once(cached_service, lesion_model):
    base_url, slides, _ = cached_service
    slide = slides / "busy.svs"
    shutil.copy(lesion_model.lesion_slide.path, slide)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: _classify(base_url, slide), range(3)))
    counters = _counters(base_url)
    assert counters["tiles"] == answers[0]["slide"]["tile_count"]
    assert _lookups(counters) == (2, 1, 0)
    assert all(answer["predictions"] == answers[0]["predictions"] for answer in answers)


def test_the_cache_keeps_the_most_recently_used_within_its_bound(tmp_path, slide_20x):
    embedded = embed_slide(str(slide_20x.path), TorchTileEncoder(build_tile_encoder("tiny_dinov2", seed=0)))
    metrics = ServiceMetrics()
    identity = EncoderIdentity("tiny", "ab" * 32, "torch fp32 on cpu")
    probe = EmbeddingCache(tmp_path / "probe", 10**9, identity, XMAG_5X, metrics)
    probe.store("0" * 64, embedded)
    entry_bytes = (tmp_path / "probe" / f"{'0' * 64}.h5").stat().st_size
    cache = EmbeddingCache(tmp_path / "cache", int(2.5 * entry_bytes), identity, XMAG_5X, ServiceMetrics())
    keys = [f"{index:064x}" for index in range(1, 4)]
    cache.store(keys[0], embedded)
    cache.store(keys[1], embedded)
    assert cache.lookup(keys[0])(embedded.level0_coords) is not None  # a hit: keys[0] is now the most recent
    os.utime(tmp_path / "cache" / f"{keys[1]}.h5", ns=(1, 1))  # and keys[1] clearly the least
    cache.store(keys[2], embedded)
    kept = sorted(path.stem for path in (tmp_path / "cache").glob("*.h5"))
    assert kept == sorted([keys[0], keys[2]])
    assert metric_value(cache.metrics.exposition().decode(), "xmag_embedding_cache_evictions_total") == 1
    assert cache.lookup(keys[1])(embedded.level0_coords) is None


def test_the_cache_benchmark_prints_and_writes_its_ratio(lesion_model, tmp_path, capsys):
    from xmag.benchmarks.cache import extraction_throughput, run_cache_benchmark

    slide = lesion_model.lesion_slide.path
    report = run_cache_benchmark(slide, lesion_model.repository, tmp_path, repeats=2)
    written = json.loads((tmp_path / "embedding_cache.json").read_text())
    assert written == report and len(report["request_seconds"]) == 3 and report["tiles"] > 0
    assert report["ratio"] == report["uncached_s"] / report["cached_median_s"]
    extraction = extraction_throughput([slide], lesion_model.repository, tmp_path)
    assert extraction["tiles"] == report["tiles"] and extraction["feature_file_bytes_per_slide"] > 0
    printed = capsys.readouterr().out
    assert "embedding cache: first request" in printed and "x faster" in printed and "extraction:" in printed
