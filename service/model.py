"""What the service tells callers about the model it serves, fixed when the engine is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from xmag.loading import repository_model_info, repository_tiling
from xmag.model_repo import ModelRepository
from xmag.result_schema import ModelInfo
from xmag.slide.tiling import TilingSpec


@dataclass(frozen=True)
class ModelDescription:
    """The model behind every answer: its ModelInfo, its tasks and their classes, and its tiling."""

    info: ModelInfo
    tasks: dict[str, list[str]]  # task -> class names
    spec: TilingSpec
    backend_measurements: list[dict] = field(default_factory=list)  # what auto-selection measured at start

    @classmethod
    def of_repository(cls, repository: ModelRepository, encoder: str, measurements: list[dict]) -> ModelDescription:
        """The description of a verified repository's model, run by the named encoder runtime."""
        return cls(
            info=repository_model_info(repository, encoder),
            tasks={task.name: list(task.class_names) for task in repository.manifest.tasks},
            spec=repository_tiling(repository),
            backend_measurements=measurements,
        )
