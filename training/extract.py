"""`xmag extract`: one feature file per slide (TRIDENT's layout), resumable, across processes and machines.

The recipe, per slide of this process's share of the list:

    feature file current (complete, same encoder sha256, runtime and tiling)?  → skipped
    else embed_slide (the one embedding path) → write_feature_file (temporary name, renamed) → done
    a typed error → failed (stop, unless skip_errors)

Each outcome is appended to `outcomes/rank-<r>.jsonl` (slide path, id,
status, error code and message, tiles, seconds) and flushed before the next
slide starts, so an interrupted run (SIGINT or SIGKILL) loses at most the
slide in flight, and a rerun redoes only what is not current. Under
`torchrun`, rank r of W takes slides r, r+W, ...; `merged_outcomes` reads
every rank's log. Slide paths may identify patients: they go to the outcome
log only; what is said on the console names slide ids (file stems).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from xmag.errors import XmagError
from xmag.features import EncoderIdentity, is_current, write_feature_file
from xmag.pipeline import embed_slide
from xmag.runtimes.protocols import TileEncoderRuntime
from xmag.slide.listing import SLIDE_SUFFIXES, find_slide_files
from xmag.slide.tiling import TilingSpec
from xmag.vocabulary import ReaderBackend

OUTCOMES_DIR = "outcomes"


class SlideListError(XmagError):
    """The list of slides to extract cannot be read: no such folder or file, a CSV without the columns, duplicate ids."""

    code = "slide_list_error"


@dataclass(frozen=True)
class SlideEntry:
    slide_id: str  # the feature file's stem; CLAM's slide_id
    path: Path


@dataclass(frozen=True)
class Outcome:
    slide: str  # the path, as given: for the log only
    slide_id: str
    status: str  # "done", "skipped" (already current) or "failed"
    code: str  # the error's code when failed, else ""
    message: str
    tiles: int
    seconds: float
    rank: int


def read_slide_list(source: Path, slide_dir: Path | None = None) -> list[SlideEntry]:
    """The slides named by a folder (searched recursively), a CLAM-style CSV, or a list file (one path a line).

    A CSV gives each slide by a `slide_path` (or `path`) column, or by
    `slide_id` with the slide searched for under `slide_dir` (CLAM's dataset
    CSVs: `case_id, slide_id, label`). Ids are read as strings (zero-padded
    ids stay as they are). Relative paths in a list file or CSV are taken from
    the file's folder. Two slides with the same id are refused: their feature
    files would overwrite each other.
    """
    if source.is_dir():
        entries = [SlideEntry(path.stem, source / path) for path in find_slide_files(source)]
    elif not source.is_file():
        raise SlideListError(f"{source} is neither a folder of slides, a CSV nor a list file")
    elif source.suffix.lower() == ".csv":
        entries = _entries_from_csv(source, slide_dir)
    else:
        lines = [line.strip() for line in source.read_text().splitlines()]
        paths = [source.parent / line for line in lines if line and not line.startswith("#")]
        entries = [SlideEntry(path.stem, path) for path in paths]
    if not entries:
        raise SlideListError(f"{source} names no slides")
    seen: dict[str, Path] = {}
    for entry in entries:
        if not entry.slide_id or entry.slide_id in (".", "..") or any(c in entry.slide_id for c in "/\\"):
            raise SlideListError(
                f"slide id {entry.slide_id!r} cannot name a feature file: no path separators, not . or .."
            )
        if entry.slide_id in seen:
            raise SlideListError(f"two slides have the id {entry.slide_id!r}: {seen[entry.slide_id]} and {entry.path}")
        seen[entry.slide_id] = entry.path
    return entries


def _entries_from_csv(source: Path, slide_dir: Path | None) -> list[SlideEntry]:
    with source.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0]) if rows else set()
    path_column = next((name for name in ("slide_path", "path") if name in columns), None)
    if path_column is not None:
        return [
            SlideEntry(row.get("slide_id") or Path(row[path_column]).stem, source.parent / row[path_column])
            for row in rows
        ]
    if "slide_id" not in columns:
        raise SlideListError(f"{source} has neither a slide_path nor a slide_id column (it has {sorted(columns)})")
    if slide_dir is None:
        raise SlideListError(f"{source} names slides by slide_id only; say where they are with --slide-dir")
    by_stem = {path.stem: slide_dir / path for path in find_slide_files(slide_dir)}
    missing = [row["slide_id"] for row in rows if row["slide_id"] not in by_stem]
    if missing:
        raise SlideListError(
            f"{len(missing)} slide id(s) of {source} have no slide file ({', '.join(sorted(SLIDE_SUFFIXES))}) "
            f"under {slide_dir}, e.g. {missing[0]!r}"
        )
    return [SlideEntry(row["slide_id"], by_stem[row["slide_id"]]) for row in rows]


def share_of(entries: list[SlideEntry], rank: int, world_size: int) -> list[SlideEntry]:
    """Rank r's slides: r, r + W, r + 2W, ... (every slide in exactly one share)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return entries[rank::world_size]


def extract_features(
    entries: list[SlideEntry],
    output_dir: Path,
    encoder: TileEncoderRuntime,
    identity: EncoderIdentity,
    spec: TilingSpec,
    *,
    backend: ReaderBackend = "openslide",
    batch_size: int = 32,
    num_workers: int = 2,
    fallback_mpp: float | None = None,
    skip_errors: bool = False,
    rank: int = 0,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Extract `entries` (this process's share) into `output_dir`; returns the outcomes, also logged.

    Stops at the first failed slide (after logging it) by raising its error,
    unless `skip_errors`.
    """
    output_dir.mkdir(parents=True, exist_ok=True)

    def already_done(entry: SlideEntry) -> bool:
        target = output_dir / f"{entry.slide_id}.h5"
        for stale in output_dir.glob(f".{glob.escape(target.name)}.*.partial"):  # a run killed while writing this slide
            stale.unlink()
        return is_current(target, identity, spec)

    def extract(entry: SlideEntry) -> int:
        embedded = embed_slide(
            str(entry.path),
            encoder,
            spec=spec,
            backend=backend,
            batch_size=batch_size,
            num_workers=num_workers,
            fallback_mpp=fallback_mpp,
        )
        write_feature_file(output_dir / f"{entry.slide_id}.h5", embedded, identity)
        return len(embedded.embeddings)

    return each_slide(entries, output_dir, rank, already_done, extract, skip_errors=skip_errors, on_outcome=on_outcome)


def each_slide(
    entries: list[SlideEntry],
    output_dir: Path,
    rank: int,
    already_done: Callable[[SlideEntry], bool],
    work: Callable[[SlideEntry], int],
    *,
    skip_errors: bool = False,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run `work` (returning the slide's tile or region count) on every entry not `already_done`, resumably.

    Each outcome is appended to `outcomes/rank-<rank>.jsonl` as it happens
    (flushed and fsynced, so a killed run keeps what it did). Stops at the
    first failed slide (after logging it) by raising its error, unless
    `skip_errors`.
    """
    log_path = output_dir / OUTCOMES_DIR / f"rank-{rank}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    outcomes = []
    with log_path.open("a") as log:
        for entry in entries:
            started = time.perf_counter()
            error: XmagError | None = None
            if already_done(entry):
                outcome = Outcome(str(entry.path), entry.slide_id, "skipped", "", "", 0, 0.0, rank)
            else:
                try:
                    count, status, code, message = work(entry), "done", "", ""
                except XmagError as failure:
                    error = failure
                    count, status, code, message = 0, "failed", failure.code, str(failure)
                seconds = time.perf_counter() - started
                outcome = Outcome(str(entry.path), entry.slide_id, status, code, message, count, seconds, rank)
            log.write(json.dumps(asdict(outcome)) + "\n")
            log.flush()
            os.fsync(log.fileno())
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            if error is not None and not skip_errors:
                raise error
    return outcomes


def merged_outcomes(output_dir: Path) -> dict[str, Outcome]:
    """Every rank's logged outcomes, the latest per slide id (a rerun's outcome replaces the earlier one)."""
    latest: dict[str, Outcome] = {}
    for log_path in sorted((output_dir / OUTCOMES_DIR).glob("rank-*.jsonl")):
        for line in log_path.read_text().splitlines():
            if line.strip():
                outcome = Outcome(**json.loads(line))
                if outcome.status != "skipped" or outcome.slide_id not in latest:
                    latest[outcome.slide_id] = outcome
    return latest


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among `torchrun`'s processes (one process: rank 0 of 1)."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environment(cls) -> Ranks:
        """torchrun's RANK, WORLD_SIZE and LOCAL_RANK, or rank 0 of 1 without them."""
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )


def wait_for_every_rank(ranks: Ranks) -> None:
    """A barrier over torchrun's processes (gloo, so CPU-only machines take part too); nothing with one process."""
    if ranks.world_size == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def summary_line(outcomes: dict[str, Outcome], seconds: float) -> str:
    """Counts, tiles per second and the failed slides' ids (not their paths)."""
    by_status = {
        status: [o for o in outcomes.values() if o.status == status] for status in ("done", "skipped", "failed")
    }
    tiles = sum(o.tiles for o in by_status["done"])
    rate = f", {tiles / seconds:.1f} tiles/s" if seconds > 0 and tiles else ""
    failed = f"; failed: {', '.join(sorted(o.slide_id for o in by_status['failed']))}" if by_status["failed"] else ""
    return (
        f"{len(by_status['done'])} extracted, {len(by_status['skipped'])} already current, "
        f"{len(by_status['failed'])} failed; {tiles} tiles in {seconds:.1f} s{rate}{failed}"
    )
