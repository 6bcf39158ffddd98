"""`xmag train pairs`: distillation pairs from slides, as WebDataset tar shards with an index of byte offsets.

A pair is one region of tissue seen twice: the teacher's view, 896 × 896 px at
0.5 µm/px (20x; cut by `teacher_crops` into UNI2-h's 16 crops of 224 in
row-major order), and the student's view, 224 × 224 px at 2.0 µm/px (5x). The
regions are the tiles of serving's 5x grid (`embed_slide`'s tissue mask and
`plan_tile_grid`), optionally a seeded subset per slide; both views are read by
the core's tiler (`iter_tile_batches`: the pyramid level and the resize serving
uses), so training sees exactly what serving sees.

Layout of the output folder:

    shards/<slide_id>-<k:05d>.tar   WebDataset samples: <key>.teacher.png, <key>.student.png, <key>.json
    records/<slide_id>.json         one per finished slide: its shards, their sha256, sizes and sample offsets
    manifest.json                   every finished slide of the list and its shards, in list order (what readers open)
    outcomes/rank-<r>.jsonl         per slide: done, skipped (already current) or failed, and why

**Why WebDataset's tar layout with our own index** (and not MosaicML Streaming
or LitData): any WebDataset reader and `tar tf` read the shards, and the
manifest gives each sample's byte offsets, so the data order is a pure
function of (seed, epoch) over global sample indices (`epoch_order`). A reader
resumes at any sample exactly, mid-epoch and on any number of ranks, by
seeking to offsets, where WebDataset's own loader can only stream and skip.
Streaming and LitData would each bring their own shard format and a large
dependency for what a tar file, an index and `np.random.default_rng` do here.
PNG keeps the pixels lossless.

**Shards never mix slides**: a slide is the unit of work, of commit and of the
split between torchrun's ranks. Its regions fill shards of at most
`shard_size` samples, each written under a temporary name and renamed when
complete; then its record is written (atomically), and only then does the
slide count as done. A rerun skips slides whose record is current (same
sampling spec and code version, every shard present at its recorded size) and
redoes the others from scratch, so an interrupted run loses at most the slide
in flight and never rewrites a finished slide's shards. Rank r of W takes
slides r, r+W, ... (`share_of`); after every rank is done, rank 0 merges the
records into `manifest.json`, deleted at the start of each run, so a
manifest on disk always describes the shards beside it. The global index
follows the list order, not the number of ranks.

**Reading** (`PairShards`): on open every shard's size is checked (a truncated
shard is an error then); each sample's bytes carry their own sha256, checked on
every read, so a damaged sample is an error when it is read, never a silent
skip or a wrong image, without hashing terabytes up front (`verify_sha256=True`
also checks every shard's sha256 on open). Slide paths may identify patients:
they go to the outcome logs only.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from xmag import __version__
from xmag.errors import SlideError, XmagError
from xmag.features import tiling_record
from xmag.slide.reader import SlideReader, open_slide, resolve_mpp
from xmag.slide.tiling import XMAG_5X, TileGrid, TilingSpec, iter_tile_batches, plan_tile_grid, tile_grid_at
from xmag.slide.tissue import DEFAULT_THUMBNAIL_UM_PER_PX, tissue_mask_for_slide
from xmag.training.extract import OUTCOMES_DIR, Outcome, SlideEntry, each_slide
from xmag.vocabulary import ReaderBackend

FORMAT = "xmag-pairs/1"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
RECORDS_DIR = "records"
TEACHER_20X = TilingSpec(target_mpp=0.5, tile_size_px=896)  # the same 448 µm as a 5x student tile
CROP_PX = 224  # the teacher's input: the 896 px region is cut into 4 × 4 crops
TEACHER_MEMBER = "teacher.png"
STUDENT_MEMBER = "student.png"
INFO_MEMBER = "json"
DEFAULT_SHARD_SIZE = 1000
# zlib level 3: on synthetic H&E, as fast as level 1 and ~5% smaller; level 6 is ~11% smaller but 2.3x slower.
PNG_COMPRESS_LEVEL = 3
_READ_BATCH = 8  # regions read per call of the tiler (8 teacher regions are ~19 MB of pixels)
# Like best_level_for_downsample's tolerance: a 20x scan stated as 0.504 µm/px is still 20x.
_MPP_TOLERANCE = 1.01


class PairShardError(XmagError, ValueError):
    """A pairs folder cannot be read: no manifest, or a shard missing, truncated or damaged (named in the message)."""

    code = "pair_shard_error"


class SlideTooCoarseError(SlideError):
    """The slide is scanned coarser than the teacher's 0.5 µm/px (20x), so its teacher view would be upsampled."""

    code = "slide_too_coarse"


@dataclass(frozen=True)
class PairsConfig:
    """How pairs are cut: the student's tissue threshold, an optional seeded subset per slide, samples per shard."""

    max_regions_per_slide: int | None = None  # None: every region of the 5x grid
    seed: int = 0  # of the subset
    shard_size: int = DEFAULT_SHARD_SIZE  # samples per shard (a slide's last shard holds the rest)
    min_tissue_fraction: float = XMAG_5X.min_tissue_fraction

    def __post_init__(self):
        if self.max_regions_per_slide is not None and self.max_regions_per_slide < 1:
            raise ValueError(f"max_regions_per_slide must be at least 1, got {self.max_regions_per_slide}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")

    @property
    def student_spec(self) -> TilingSpec:
        """Serving's 5x tiling with this tissue threshold."""
        return replace(XMAG_5X, min_tissue_fraction=self.min_tissue_fraction)

    def record(self) -> dict:
        """What decides a slide's samples, as recorded and compared on a rerun (the shard size does not)."""
        return {
            "teacher": tiling_record(TEACHER_20X),
            "student": tiling_record(self.student_spec),
            "tissue_um_per_px": DEFAULT_THUMBNAIL_UM_PER_PX,
            "max_regions_per_slide": self.max_regions_per_slide,
            "seed": self.seed,
            "xmag_code_version": __version__,
        }


def plan_regions(reader: SlideReader, slide_mpp: float, config: PairsConfig, slide_id: str) -> TileGrid:
    """One slide's regions: serving's 5x tile grid on its tissue, or a seeded subset of it, in grid order.

    The subset is drawn from (seed, slide id), so it does not depend on the
    slide's position in the list or on the rank that reads it.
    """
    tissue, _ = tissue_mask_for_slide(reader, slide_mpp, DEFAULT_THUMBNAIL_UM_PER_PX)
    grid = plan_tile_grid(reader.info, slide_mpp, tissue, config.student_spec)
    limit = config.max_regions_per_slide
    if limit is None or len(grid) <= limit:
        return grid
    slide_number = int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "little")
    chosen = np.sort(np.random.default_rng([config.seed, slide_number]).choice(len(grid), limit, replace=False))
    return replace(grid, level0_coords=grid.level0_coords[chosen])


def teacher_crops(teacher_region: np.ndarray, crop_px: int = CROP_PX) -> np.ndarray:
    """The teacher region (896, 896, 3) as 16 crops (16, 224, 224, 3) in row-major order.

    Crop i is row i // 4, column i % 4: the rows of crops top to bottom, left
    to right within a row, the order of the student's 4 × 4 mean-pooled patch cells.
    """
    side_px = teacher_region.shape[0]
    if teacher_region.ndim != 3 or teacher_region.shape[1] != side_px or side_px % crop_px:
        raise ValueError(f"a teacher region is square with a side a multiple of {crop_px}, got {teacher_region.shape}")
    per_side = side_px // crop_px
    channels = teacher_region.shape[2]
    blocks = teacher_region.reshape(per_side, crop_px, per_side, crop_px, channels)
    return blocks.transpose(0, 2, 1, 3, 4).reshape(per_side * per_side, crop_px, crop_px, channels)


def sample_key(slide_id: str, level0_xy: tuple[int, int]) -> str:
    """The WebDataset key of a region: no dots (WebDataset splits a name at its first dot), unique per slide."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', slide_id)}_x{level0_xy[0]}_y{level0_xy[1]}"


def shard_name(slide_id: str, number: int) -> str:
    """The file name of a slide's shard `number` (from 0)."""
    return f"{slide_id}-{number:05d}.tar"


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A new file next to `path`, readable by all (mkstemp makes 0600; other users' training jobs read the data)."""
    descriptor, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.fchmod(descriptor, 0o644)
    return descriptor, partial


class _ShardWriter:
    """One tar shard written under a temporary name; `close()` ends the archive, syncs it and renames it.

    Headers come from tarfile's own `TarInfo.tobuf`, so the offsets we record
    are exact; TarInfo's defaults (mtime 0, owner 0, mode 644) make a rerun
    write the same bytes.
    """

    def __init__(self, path: Path, slide_id: str):
        self.path = path
        self.slide_id = slide_id
        descriptor, partial = _temporary_beside(path)
        self._partial = Path(partial)
        self._file = os.fdopen(descriptor, "wb")
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._samples: list[dict] = []

    def add(self, level0_xy: tuple[int, int], members: dict[str, bytes]) -> None:
        key = sample_key(self.slide_id, level0_xy)
        span_start = offset = self._size
        chunks: list[bytes] = []
        placed: dict[str, list[int]] = {}
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            padding = b"\0" * (-len(data) % tarfile.BLOCKSIZE)
            placed[suffix] = [offset + len(header), len(data)]
            chunks += [header, data, padding]
            offset += len(header) + len(data) + len(padding)
        span = b"".join(chunks)
        self._write(span)
        self._samples.append(
            {
                "key": key,
                "level0_xy": list(level0_xy),
                "span": [span_start, len(span)],
                "members": placed,
                "sha256": hashlib.sha256(span).hexdigest(),
            }
        )

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha256.update(data)
        self._size += len(data)

    def close(self) -> dict:
        """End the archive (two zero blocks, padded to tar's record size), rename it; its manifest entry."""
        end = 2 * tarfile.BLOCKSIZE
        self._write(b"\0" * (end + (-(self._size + end) % tarfile.RECORDSIZE)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial, self.path)
        return {
            "name": f"{SHARDS_DIR}/{self.path.name}",
            "slide_id": self.slide_id,
            "sha256": self._sha256.hexdigest(),
            "bytes": self._size,
            "samples": self._samples,
        }

    def discard(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _write_shard(
    reader: SlideReader, path: Path, slide_id: str, slide_mpp: float, student: TileGrid, teacher: TileGrid
) -> dict:
    """Both views of the grids' regions into one shard; the temporary file is removed if anything fails."""
    writer = _ShardWriter(path, slide_id)
    try:
        views = zip(
            iter_tile_batches(reader, student, _READ_BATCH),
            iter_tile_batches(reader, teacher, _READ_BATCH),
            strict=True,
        )
        for (students, coords), (teachers, _) in views:
            for student_view, teacher_view, xy in zip(students, teachers, coords, strict=True):
                level0_xy = (int(xy[0]), int(xy[1]))
                info = {
                    "slide_id": slide_id,
                    "level0_xy": list(level0_xy),
                    "region_size_level0_px": student.tile_size_level0_px,
                    "slide_mpp": slide_mpp,
                    "teacher_mpp": TEACHER_20X.target_mpp,
                    "teacher_px": TEACHER_20X.output_px,
                    "student_mpp": student.spec.target_mpp,
                    "student_px": student.spec.output_px,
                }
                members = {
                    TEACHER_MEMBER: _png(teacher_view),
                    STUDENT_MEMBER: _png(student_view),
                    INFO_MEMBER: json.dumps(info, sort_keys=True).encode(),
                }
                writer.add(level0_xy, members)
        return writer.close()
    except BaseException:
        writer.discard()
        raise


def _write_slide(
    entry: SlideEntry,
    output_dir: Path,
    config: PairsConfig,
    backend: ReaderBackend,
    num_workers: int,
    fallback_mpp: float | None,
) -> dict:
    """Plan one slide's regions, write its shards; its record (not yet written)."""
    with open_slide(str(entry.path), backend=backend, num_workers=num_workers) as reader:
        slide_mpp = resolve_mpp(reader.info, fallback_mpp, str(entry.path))
        if slide_mpp > TEACHER_20X.target_mpp * _MPP_TOLERANCE:
            raise SlideTooCoarseError(
                f"Slide {entry.slide_id} is scanned at {slide_mpp:.3f} µm/px ({10 / slide_mpp:.0f}x), coarser than "
                f"the teacher's {TEACHER_20X.target_mpp} µm/px (20x): its teacher view would be upsampled. "
                "Pairs need slides scanned at 20x or finer; leave this one out of the list.",
                str(entry.path),
            )
        student = plan_regions(reader, slide_mpp, config, entry.slide_id)
        # 896 px at 0.5 µm/px is 224 px at 2.0 µm/px: the same level-0 box, read from the 20x level.
        teacher = tile_grid_at(reader.info, slide_mpp, student.level0_coords, TEACHER_20X)
        shards = []
        for number, start in enumerate(range(0, len(student), config.shard_size)):
            part = slice(start, start + config.shard_size)
            shards.append(
                _write_shard(
                    reader,
                    output_dir / SHARDS_DIR / shard_name(entry.slide_id, number),
                    entry.slide_id,
                    slide_mpp,
                    replace(student, level0_coords=student.level0_coords[part]),
                    replace(teacher, level0_coords=teacher.level0_coords[part]),
                )
            )
    return {
        "format": FORMAT,
        "spec": config.record(),
        "slide_id": entry.slide_id,
        "slide_mpp": slide_mpp,
        "region_size_level0_px": student.tile_size_level0_px,
        "regions": len(student),
        "shards": shards,
    }


def _current_record(output_dir: Path, slide_id: str, config: PairsConfig) -> dict | None:
    """The slide's record if it was made with this config and every shard it names is there at its size."""
    path = output_dir / RECORDS_DIR / f"{slide_id}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("spec") != config.record():
        return None
    for shard in record["shards"]:
        shard_path = output_dir / shard["name"]
        if not shard_path.is_file() or shard_path.stat().st_size != shard["bytes"]:
            return None
    return record


def _forget_slide(output_dir: Path, slide_id: str) -> None:
    """Remove a slide's record first (so nothing names its shards), then its shards and leftover partial files."""
    (output_dir / RECORDS_DIR / f"{slide_id}.json").unlink(missing_ok=True)
    shard_pattern = glob.escape(slide_id) + "-[0-9][0-9][0-9][0-9][0-9].tar"
    for pattern in (shard_pattern, f".{shard_pattern}.*.partial"):
        for path in (output_dir / SHARDS_DIR).glob(pattern):
            path.unlink()


def _write_json_atomically(path: Path, content: dict) -> None:
    descriptor, partial = _temporary_beside(path)
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(content, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def write_pairs(
    entries: list[SlideEntry],
    output_dir: Path,
    config: PairsConfig,
    *,
    backend: ReaderBackend = "openslide",
    num_workers: int = 2,
    fallback_mpp: float | None = None,
    skip_errors: bool = False,
    rank: int = 0,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Write the pairs of `entries` (this process's share) into `output_dir`; the outcomes, also logged.

    A slide whose record is current is skipped. Stops at the first failed
    slide (after logging it) by raising its error, unless `skip_errors`. An
    outcome's `tiles` is the slide's number of regions. Rank 0 deletes
    `manifest.json`; `write_manifest` writes it once every rank is done.
    """
    for folder in (SHARDS_DIR, RECORDS_DIR, OUTCOMES_DIR):
        (output_dir / folder).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (output_dir / MANIFEST_FILE).unlink(missing_ok=True)

    def write_slide(entry: SlideEntry) -> int:
        _forget_slide(output_dir, entry.slide_id)
        record = _write_slide(entry, output_dir, config, backend, num_workers, fallback_mpp)
        _write_json_atomically(output_dir / RECORDS_DIR / f"{entry.slide_id}.json", record)
        return record["regions"]

    return each_slide(
        entries,
        output_dir,
        rank,
        lambda entry: _current_record(output_dir, entry.slide_id, config) is not None,
        write_slide,
        skip_errors=skip_errors,
        on_outcome=on_outcome,
    )


def write_manifest(output_dir: Path, entries: list[SlideEntry], config: PairsConfig) -> dict:
    """Merge the current records of `entries` (the whole list, every rank's) into `manifest.json`, in list order.

    Slides without a current record (failed, or not reached) are left out.
    Returns the manifest.
    """
    records = [record for entry in entries if (record := _current_record(output_dir, entry.slide_id, config))]
    shards = [shard for record in records for shard in record["shards"]]
    manifest = {
        "format": FORMAT,
        "spec": config.record(),
        "samples": sum(len(shard["samples"]) for shard in shards),
        "slides": [
            {key: record[key] for key in ("slide_id", "slide_mpp", "region_size_level0_px", "regions")}
            for record in records
        ],
        "shards": shards,
    }
    _write_json_atomically(output_dir / MANIFEST_FILE, manifest)
    return manifest


def summary_line(outcomes: list[Outcome], seconds: float) -> str:
    """Counts, regions per second and the failed slides' ids (not their paths)."""
    done = [o for o in outcomes if o.status == "done"]
    skipped = sum(o.status == "skipped" for o in outcomes)
    failed = sorted(o.slide_id for o in outcomes if o.status == "failed")
    regions = sum(o.tiles for o in done)
    rate = f", {regions / seconds:.1f} regions/s" if seconds > 0 and regions else ""
    failed_ids = f"; failed: {', '.join(failed)}" if failed else ""
    return (
        f"{len(done)} written, {skipped} already current, {len(failed)} failed; "
        f"{regions} pairs in {seconds:.1f} s{rate}{failed_ids}"
    )


@dataclass(frozen=True)
class Pair:
    """One region in both views, as the distillation loop takes it."""

    teacher: np.ndarray  # (896, 896, 3) uint8 at 0.5 µm/px; teacher_crops cuts it into the teacher's 16 inputs
    student: np.ndarray  # (224, 224, 3) uint8 at 2.0 µm/px
    slide_id: str
    level0_xy: tuple[int, int]  # the region's top-left corner in level-0 pixels
    key: str  # its WebDataset key


def epoch_order(sample_count: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Rank `rank`'s global sample indices for `epoch`, in the order to read them.

    The epoch's order is a permutation drawn from `np.random.default_rng([seed,
    epoch])`: the same on every rank and every rerun, a new one each epoch. It
    is padded by repeating its first indices (as torch's DistributedSampler
    does) to a multiple of `world_size`, and rank r takes every W-th index from
    r, so every rank gets the same count and, where `sample_count` divides by W,
    the shares are disjoint. A loop interrupted after `position` samples of this
    rank's share resumes exactly with `epoch_order(...)[position:]`.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative integers, got {seed} and {epoch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(sample_count)
    per_rank = -(-sample_count // world_size)
    return np.resize(order, per_rank * world_size)[rank::world_size] if sample_count else order


class PairShards:
    """The pairs of one folder written by `xmag train pairs`, by global index (manifest order).

    On open every shard is checked to exist at its recorded size (a truncated
    shard raises PairShardError naming it); with `verify_sha256` its sha256 is
    checked too. Each read checks the sample's own sha256, so a damaged sample
    raises PairShardError when read. Reads open the file, seek and read one
    span: safe in threads and in forked DataLoader workers.
    """

    def __init__(self, directory: str | os.PathLike[str], *, verify_sha256: bool = False):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise PairShardError(
                f"No {MANIFEST_FILE} in {self.directory}: `xmag train pairs` has not finished there; rerun it."
            ) from None
        except (OSError, ValueError) as error:
            raise PairShardError(f"{manifest_path} cannot be read: {error}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise PairShardError(f"{manifest_path} is not a pairs manifest of format {FORMAT}")
        try:
            self.spec: dict = manifest["spec"]  # PairsConfig.record() of the run
            self.slides: list[dict] = manifest["slides"]  # slide_id, slide_mpp, region_size_level0_px, regions
            self._index_samples(manifest["shards"])
        except (KeyError, TypeError, IndexError, ValueError) as error:
            raise PairShardError(f"{manifest_path} is incomplete or malformed: {error!r}") from None
        for shard in self._shards:
            self._check_size(shard)
        if verify_sha256:
            for shard in self._shards:
                self._check_sha256(shard)

    def _index_samples(self, shards: list[dict]) -> None:
        """Per-sample facts as arrays (a few dozen bytes a sample), the manifest's dicts dropped: compact in memory
        and shared, not copied, by forked DataLoader workers."""
        samples = [(number, sample) for number, shard in enumerate(shards) for sample in shard["samples"]]
        self._shards = [{key: value for key, value in shard.items() if key != "samples"} for shard in shards]
        self._shard_of = np.array([number for number, _ in samples], dtype=np.int64)
        self._spans = np.array([sample["span"] for _, sample in samples], dtype=np.int64).reshape(-1, 2)
        self._members = np.array(
            [[sample["members"][member] for member in (TEACHER_MEMBER, STUDENT_MEMBER)] for _, sample in samples],
            dtype=np.int64,
        ).reshape(-1, 2, 2)
        self._level0_xy = np.array([sample["level0_xy"] for _, sample in samples], dtype=np.int64).reshape(-1, 2)
        self._digests = np.array(
            [np.frombuffer(bytes.fromhex(sample["sha256"]), np.uint8) for _, sample in samples], dtype=np.uint8
        ).reshape(-1, 32)

    def _check_size(self, shard: dict) -> None:
        path = self.directory / shard["name"]
        if not path.is_file():
            raise PairShardError(f"shard {shard['name']} of {self.directory} is missing")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise PairShardError(
                f"shard {shard['name']} of {self.directory} is {size} bytes, not the {shard['bytes']} recorded: "
                "truncated or replaced; rerun `xmag train pairs` after deleting its slide's record"
            )

    def _check_sha256(self, shard: dict) -> None:
        digest = hashlib.sha256()
        with (self.directory / shard["name"]).open("rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
        if digest.hexdigest() != shard["sha256"]:
            raise PairShardError(f"shard {shard['name']} of {self.directory} does not match its recorded sha256")

    def __len__(self) -> int:
        return len(self._shard_of)

    def __getitem__(self, index: int) -> Pair:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair {index} of {len(self)}")
        index %= len(self)
        shard = self._shards[self._shard_of[index]]
        span_start, span_length = (int(value) for value in self._spans[index])
        with (self.directory / shard["name"]).open("rb") as handle:
            handle.seek(span_start)
            span = handle.read(span_length)
        level0_xy = (int(self._level0_xy[index, 0]), int(self._level0_xy[index, 1]))
        key = sample_key(shard["slide_id"], level0_xy)
        where = f"shard {shard['name']} of {self.directory}, sample {key}"
        if len(span) != span_length:
            raise PairShardError(f"{where}: the shard ends {span_length - len(span)} bytes early (truncated)")
        if hashlib.sha256(span).digest() != self._digests[index].tobytes():
            raise PairShardError(f"{where}: its bytes do not match their recorded sha256 (damaged)")
        (teacher_offset, teacher_size), (student_offset, student_size) = (
            (int(offset) - span_start, int(size)) for offset, size in self._members[index]
        )
        return Pair(
            teacher=_decode(span[teacher_offset : teacher_offset + teacher_size], TEACHER_20X.output_px, where),
            student=_decode(span[student_offset : student_offset + student_size], XMAG_5X.output_px, where),
            slide_id=shard["slide_id"],
            level0_xy=level0_xy,
            key=key,
        )

    def epoch_order(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """This rank's global indices for `epoch` (see the module function `epoch_order`)."""
        return epoch_order(len(self), seed, epoch, rank, world_size)


def _decode(data: bytes, side_px: int, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.array(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise PairShardError(f"{where}: a PNG cannot be decoded ({error})") from None
    if pixels.shape != (side_px, side_px, 3):
        raise PairShardError(f"{where}: a view is {pixels.shape}, not ({side_px}, {side_px}, 3)")
    return pixels
