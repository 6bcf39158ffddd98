"""Recent results kept in memory so their heatmap PNG and GeoJSON can be fetched after the response.

Bounded (least recently stored results are dropped first) and lost on restart;
a fetch of a dropped result gets ResultNotFoundError, which says so.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import threading

import numpy as np

from xmag.heatmap import attention_geojson, render_attention_heatmap
from xmag.service.errors import ResultNotFoundError
from xmag.service.jobs import EngineResult


class ResultStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._results: collections.OrderedDict[str, EngineResult] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, result: EngineResult) -> None:
        if self.capacity == 0:
            return
        # The heatmaps need the thumbnail, coordinates and attention, not the embeddings.
        slim = dataclasses.replace(
            result, slide=dataclasses.replace(result.slide, embeddings=np.empty((0, 0), np.float32))
        )
        with self._lock:
            self._results[result.job_id] = slim
            while len(self._results) > self.capacity:
                self._results.popitem(last=False)

    def get(self, result_id: str, task: str) -> EngineResult:
        with self._lock:
            result = self._results.get(result_id)
        if result is None:
            raise ResultNotFoundError(
                f"no stored result {result_id!r}: results are kept only for the last {self.capacity} slides "
                "classified with heatmap=true, and not across restarts; classify the slide again"
            )
        if task not in result.slide.predictions:
            raise ResultNotFoundError(
                f"result {result_id!r} has no task {task!r}; it has {sorted(result.slide.predictions)}"
            )
        return result

    def heatmap_png(self, result_id: str, task: str) -> bytes:
        slide = self.get(result_id, task).slide
        image = render_attention_heatmap(
            slide.thumbnail,
            slide.tissue.level0_px_per_mask_px,
            slide.level0_coords,
            slide.tile_size_level0_px,
            slide.predictions[task].attention,
        )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def geojson(self, result_id: str, task: str) -> dict:
        slide = self.get(result_id, task).slide
        return attention_geojson(
            slide.level0_coords, slide.tile_size_level0_px, slide.predictions[task].attention, task
        )
