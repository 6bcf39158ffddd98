"""The service's embedding cache: a classified slide's tile embeddings kept as a feature file, reused by later requests.

A second request for the same slide (or for other tasks of it) then opens the
slide and plans its grid (cheap) but reads and encodes no tile: only the heads
run. An entry is one feature file in TRIDENT's layout (`xmag/features.py`),
named by a key of three parts:

- the slide's **fingerprint**: its device and inode numbers, size, and
  modification and status-change times in nanoseconds, plus the sha256 of its
  first and last MiB. Any write through the file system changes the
  status-change time, which no user can set back, and a file replaced under
  the same path (copied, renamed, restored) has another inode or times; the
  content hash guards file systems with coarse or unreliable times. Hashing
  2 MiB costs milliseconds, where hashing a whole slide (gigabytes) would cost
  seconds per request. A slide whose fingerprint changed is a miss, never a
  stale hit;
- the encoder's identity (weights sha256 and runtime);
- the tiling.

On a hit the stored coordinates must equal the grid planned now, else it is a
miss. A file that cannot be read (truncated, corrupt) is deleted and
re-encoded, never served. Entries are written whole (temporary name, rename).
The cache is bounded by bytes: when over, the least recently used entries
(by modification time, which a hit refreshes) are evicted. Concurrent requests
for the same key wait for one another, so a slide is encoded once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from xmag.features import EncoderIdentity, FeatureFileError, read_feature_file, tiling_record, write_feature_file
from xmag.pipeline import SlideEmbeddings
from xmag.service.metrics import ServiceMetrics
from xmag.slide.tiling import TilingSpec

log = logging.getLogger("xmag.embedding_cache")

_EDGE_BYTES = 1 << 20  # the first and the last MiB of a slide go into its fingerprint
_KEY_LOCK_STRIPES = 64


def slide_fingerprint(path: Path) -> str:
    """A fingerprint that a changed or replaced file cannot match (see the module docstring)."""
    stat = path.stat()
    digest = hashlib.sha256(
        f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}".encode()
    )
    with path.open("rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        if stat.st_size > 2 * _EDGE_BYTES:
            handle.seek(-_EDGE_BYTES, os.SEEK_END)
            digest.update(handle.read(_EDGE_BYTES))
    return digest.hexdigest()


class EmbeddingCache:
    """Feature files under `directory`, at most `max_bytes` in all; thread-safe."""

    def __init__(
        self, directory: Path, max_bytes: int, identity: EncoderIdentity, spec: TilingSpec, metrics: ServiceMetrics
    ):
        self.directory = directory
        self.max_bytes = max_bytes
        self.identity = identity
        self.spec = spec
        self.metrics = metrics
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Striped locks: one per key would grow with every slide ever seen; two keys sharing a stripe only wait.
        self._key_locks = [threading.Lock() for _ in range(_KEY_LOCK_STRIPES)]
        # What identity and tiling mean for every key, computed once.
        self._model_part = json.dumps(
            {"sha256": identity.sha256, "runtime": identity.runtime, "tiling": tiling_record(spec)}, sort_keys=True
        )
        self.metrics.cache_bytes.set_function(self._total_bytes)

    def key(self, slide_path: Path) -> str:
        """The entry's name for this slide with this encoder and tiling."""
        return hashlib.sha256(f"{slide_fingerprint(slide_path)}:{self._model_part}".encode()).hexdigest()

    @contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold the key while looking up and, on a miss, encoding and storing: concurrent requests encode once."""
        with self._key_locks[int(key[:8], 16) % _KEY_LOCK_STRIPES]:
            yield

    def lookup(self, key: str):
        """A lookup for `embed_slide(cached=...)`: the stored embeddings of exactly the planned tiles, or None."""

        def stored_embeddings(coords: np.ndarray) -> np.ndarray | None:
            path = self._path(key)
            if not path.is_file():
                self.metrics.cache_lookups.labels(result="miss").inc()
                return None
            try:
                found = read_feature_file(path)
            except FeatureFileError as error:
                log.warning("embedding cache entry %s is unreadable (%s); it is encoded again", path.name, error)
                path.unlink(missing_ok=True)
                self.metrics.cache_lookups.labels(result="corrupt").inc()
                return None
            if not np.array_equal(found.coords, coords) or len(found.features) != len(coords):
                self.metrics.cache_lookups.labels(result="miss").inc()
                return None
            os.utime(path)  # most recently used
            self.metrics.cache_lookups.labels(result="hit").inc()
            return found.features

        return stored_embeddings

    def store(self, key: str, embedded: SlideEmbeddings) -> None:
        """Keep a freshly encoded slide's embeddings, then evict the least recently used entries beyond the bound."""
        write_feature_file(self._path(key), embedded, self.identity)
        self._evict()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.h5"

    def _total_bytes(self) -> float:
        return float(sum(path.stat().st_size for path in self.directory.glob("*.h5")))

    def _evict(self) -> None:
        with self._lock:
            entries = sorted(self.directory.glob("*.h5"), key=lambda path: path.stat().st_mtime_ns)
            total = sum(path.stat().st_size for path in entries)
            while entries and total > self.max_bytes:
                oldest = entries.pop(0)
                total -= oldest.stat().st_size
                oldest.unlink(missing_ok=True)
                self.metrics.cache_evictions.inc()
