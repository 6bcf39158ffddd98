"""`xmag train pairs`: pairs read by serving's tiler, WebDataset shards with an exact index, resumable, validated."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tiling import XMAG_5X, iter_tile_batches, plan_tile_grid
from xmag.slide.tissue import DEFAULT_THUMBNAIL_UM_PER_PX, tissue_mask_for_slide
from xmag.synthetic.slide import make_synthetic_slide
from xmag.training.extract import read_slide_list
from xmag.training.pairs import (
    MANIFEST_FILE,
    PairsConfig,
    PairShardError,
    PairShards,
    epoch_order,
    teacher_crops,
    write_manifest,
    write_pairs,
)

SLIDE_SEEDS = {"alpha": 31, "beta": 32, "gamma": 33}
CONFIG = PairsConfig(shard_size=4)  # small shards, so a slide spans several


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs_slides")
    for slide_id, seed in SLIDE_SEEDS.items():
        make_synthetic_slide(
            folder / f"{slide_id}.svs", width_px=4_000, height_px=3_000, base_magnification=20, seed=seed
        )
    make_synthetic_slide(folder / "tenx.svs", width_px=2_000, height_px=1_500, base_magnification=10, seed=34)
    return folder


def _slide_list(folder, *names: str):
    path = folder / f"list-{len(list(folder.glob('list-*')))}.txt"
    path.write_text("".join(f"{name}\n" for name in names))
    return path


@pytest.fixture(scope="module")
def written(slides):
    """All three 20x slides written in one uninterrupted run of the library."""
    entries = read_slide_list(_slide_list(slides, *(f"{slide_id}.svs" for slide_id in SLIDE_SEEDS)))
    output_dir = slides / "written"
    outcomes = write_pairs(entries, output_dir, CONFIG)
    assert [outcome.status for outcome in outcomes] == ["done"] * 3
    write_manifest(output_dir, entries, CONFIG)
    return output_dir


def _serving_tiles(slide_path) -> dict[tuple[int, int], np.ndarray]:
    """The 5x tiles `embed_slide` reads for a slide, by level-0 corner: its own planning, step by step."""
    with open_slide(str(slide_path)) as reader:
        mpp = resolve_mpp(reader.info)
        tissue, _ = tissue_mask_for_slide(reader, mpp, DEFAULT_THUMBNAIL_UM_PER_PX)
        grid = plan_tile_grid(reader.info, mpp, tissue, XMAG_5X)
        return {
            (int(x), int(y)): tile
            for tiles, coords in iter_tile_batches(reader, grid, 32)
            for tile, (x, y) in zip(tiles, coords, strict=True)
        }


def _xmag(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xmag.cli", "train", "pairs", *arguments], capture_output=True, text=True, timeout=300
    )


def test_pairs_are_read_back_with_the_student_view_serving_reads(slides, written):
    pairs = PairShards(written)
    manifest = json.loads((written / MANIFEST_FILE).read_text())
    assert len(pairs) == manifest["samples"] == sum(slide["regions"] for slide in manifest["slides"]) > 10
    assert [slide["slide_id"] for slide in manifest["slides"]] == list(SLIDE_SEEDS)
    index = 0
    for slide_id in SLIDE_SEEDS:
        serving = _serving_tiles(slides / f"{slide_id}.svs")
        read_back = {}
        while index < len(pairs) and pairs[index].slide_id == slide_id:
            pair = pairs[index]
            assert pair.teacher.shape == (896, 896, 3) and pair.student.shape == (224, 224, 3)
            assert pair.teacher.dtype == pair.student.dtype == np.uint8
            assert pair.key == f"{slide_id}_x{pair.level0_xy[0]}_y{pair.level0_xy[1]}"
            read_back[pair.level0_xy] = pair.student
            index += 1
        assert list(read_back) == list(serving)  # every tissue tile of the 5x grid, in grid order, nothing else
        for level0_xy, tile in serving.items():
            np.testing.assert_array_equal(read_back[level0_xy], tile)
    assert index == len(pairs)
    np.testing.assert_array_equal(pairs[-1].student, pairs[len(pairs) - 1].student)
    with pytest.raises(IndexError):
        pairs[len(pairs)]


def test_the_teacher_view_is_the_same_box_at_20x(slides, written):
    pairs = PairShards(written)
    same, other = [], []
    with open_slide(str(slides / "alpha.svs")) as reader:
        for index in range(len(pairs)):
            pair = pairs[index]
            if pair.slide_id != "alpha":
                continue
            # A 20x slide's teacher view is level 0 as stored: 896 level-0 px from the same corner as the student's.
            np.testing.assert_array_equal(pair.teacher, reader.read_region(pair.level0_xy, 0, (896, 896)))
            downsampled = pair.teacher.reshape(224, 4, 224, 4, 3).astype(np.float64).mean(axis=(1, 3))
            same.append(np.abs(downsampled - pair.student).mean())
            other.append(np.abs(downsampled - pairs[(index + 1) % len(pairs)].student).mean())
    print(
        f"teacher 4x box-downsampled vs student, mean abs difference: same region {np.mean(same):.2f} (max "
        f"{np.max(same):.2f}), next region {np.mean(other):.2f} (min {np.min(other):.2f}) grey levels"
    )
    assert max(same) < 6.0
    assert min(other) > 2 * max(same)


def test_teacher_crops_are_row_major():
    region = np.zeros((896, 896, 3), np.uint8)
    for row in range(4):
        for column in range(4):
            region[row * 224 : (row + 1) * 224, column * 224 : (column + 1) * 224] = 4 * row + column
    crops = teacher_crops(region)
    assert crops.shape == (16, 224, 224, 3)
    assert [int(crop.min()) for crop in crops] == [int(crop.max()) for crop in crops] == list(range(16))
    noise = np.random.default_rng(0).integers(0, 256, (896, 896, 3), dtype=np.uint8)
    np.testing.assert_array_equal(teacher_crops(noise)[6], noise[224:448, 448:672])  # row 1, column 2
    with pytest.raises(ValueError):
        teacher_crops(noise[:, :800])


def test_the_manifest_describes_webdataset_shards_exactly(written):
    manifest = json.loads((written / MANIFEST_FILE).read_text())
    assert manifest["spec"] == CONFIG.record()
    assert manifest["spec"]["teacher"]["target_mpp"] == 0.5 and manifest["spec"]["teacher"]["tile_size_px"] == 896
    assert manifest["spec"]["student"]["target_mpp"] == 2.0 and manifest["spec"]["student"]["tile_size_px"] == 224
    assert all(slide["region_size_level0_px"] == 896 and slide["slide_mpp"] == 0.5 for slide in manifest["slides"])
    assert len(manifest["shards"]) > len(manifest["slides"])  # shard_size 4 splits slides
    for shard in manifest["shards"]:
        path = written / shard["name"]
        content = path.read_bytes()
        assert len(content) == shard["bytes"] and hashlib.sha256(content).hexdigest() == shard["sha256"]
        assert 1 <= len(shard["samples"]) <= CONFIG.shard_size
        with tarfile.open(path) as archive:
            members = archive.getmembers()
        # WebDataset's grouping: the key is the name up to its first dot.
        keys = [member.name.split(".", 1)[0] for member in members]
        assert keys == [sample["key"] for sample in shard["samples"] for _ in range(3)]
        by_name = {member.name: member for member in members}
        for sample in shard["samples"]:
            for suffix, (offset, size) in sample["members"].items():
                member = by_name[f"{sample['key']}.{suffix}"]
                assert (member.offset_data, member.size) == (offset, size)
            span_start, span_length = sample["span"]
            assert hashlib.sha256(content[span_start : span_start + span_length]).hexdigest() == sample["sha256"]
            offset, size = sample["members"]["json"]
            info = json.loads(content[offset : offset + size])
            assert info["slide_id"] == shard["slide_id"] and info["level0_xy"] == sample["level0_xy"]
            assert (info["teacher_mpp"], info["teacher_px"], info["student_mpp"], info["student_px"]) == (
                0.5,
                896,
                2.0,
                224,
            )
            assert info["region_size_level0_px"] == 896
    if shutil.which("tar"):
        listed = subprocess.run(["tar", "tf", written / manifest["shards"][0]["name"]], capture_output=True, text=True)
        assert listed.returncode == 0 and listed.stdout.split() == [
            f"{sample['key']}.{suffix}"
            for sample in manifest["shards"][0]["samples"]
            for suffix in ("teacher.png", "student.png", "json")
        ]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    first = epoch_order(10, seed=7, epoch=0)
    assert sorted(first) == list(range(10))
    np.testing.assert_array_equal(first, epoch_order(10, seed=7, epoch=0))
    assert not np.array_equal(first, epoch_order(10, seed=7, epoch=1))
    assert not np.array_equal(first, epoch_order(10, seed=8, epoch=0))
    shares = [epoch_order(12, 7, 3, rank, 3) for rank in range(3)]
    assert sorted(np.concatenate(shares)) == list(range(12))  # disjoint and covering
    padded = [epoch_order(11, 7, 3, rank, 3) for rank in range(3)]
    assert {len(share) for share in padded} == {4}
    assert set(np.concatenate(padded)) == set(range(11))  # one index repeated, to give every rank the same count
    resumed = epoch_order(11, 7, 3, 1, 3)[2:]
    np.testing.assert_array_equal(resumed, padded[1][2:])
    with pytest.raises(ValueError):
        epoch_order(10, 7, 0, rank=2, world_size=2)


def test_a_subset_per_slide_is_seeded_and_a_new_spec_redoes_the_slide(slides, tmp_path):
    entries = read_slide_list(_slide_list(slides, "beta.svs"))
    full = set(_serving_tiles(slides / "beta.svs"))
    chosen = []
    for folder in ("a", "b"):
        write_pairs(entries, tmp_path / folder, PairsConfig(max_regions_per_slide=2, seed=5))
        write_manifest(tmp_path / folder, entries, PairsConfig(max_regions_per_slide=2, seed=5))
        pairs = PairShards(tmp_path / folder)
        chosen.append([pairs[index].level0_xy for index in range(len(pairs))])
    assert chosen[0] == chosen[1] and len(chosen[0]) == 2 and set(chosen[0]) <= full
    again = write_pairs(entries, tmp_path / "a", PairsConfig(max_regions_per_slide=3, seed=5))
    assert [(outcome.status, outcome.tiles) for outcome in again] == [("done", 3)]
    assert not (tmp_path / "a" / MANIFEST_FILE).exists()  # a run in progress leaves none behind
    assert len(list((tmp_path / "a" / "shards").glob("*.tar"))) == 1


def test_an_interrupted_run_resumes_and_adds_only_the_rest(slides, written, tmp_path):
    output_dir = tmp_path / "resumed"
    first = _xmag(str(_slide_list(slides, "alpha.svs")), "--out", str(output_dir), "--shard-size", "4")
    assert first.returncode == 0, first.stderr
    alpha_shards = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in output_dir.glob("shards/*")}
    stale = output_dir / "shards" / ".beta-00000.tar.killed.partial"  # what a run killed while writing beta leaves
    stale.write_bytes(b"half a shard")

    everything = _slide_list(slides, *(f"{slide_id}.svs" for slide_id in SLIDE_SEEDS))
    second = _xmag(str(everything), "--out", str(output_dir), "--shard-size", "4")
    assert second.returncode == 0, second.stderr
    assert "2 written, 1 already current, 0 failed" in second.stdout
    for name, (mtime_ns, content) in alpha_shards.items():
        path = output_dir / "shards" / name
        assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime_ns, content)
    assert not stale.exists()
    log = [json.loads(line) for line in (output_dir / "outcomes" / "rank-0.jsonl").read_text().splitlines()]
    assert [(entry["slide_id"], entry["status"]) for entry in log] == [
        ("alpha", "done"),
        ("alpha", "skipped"),
        ("beta", "done"),
        ("gamma", "done"),
    ]
    # The resumed folder holds exactly the shards of one uninterrupted run.
    resumed = json.loads((output_dir / MANIFEST_FILE).read_text())
    uninterrupted = json.loads((written / MANIFEST_FILE).read_text())
    assert [(s["name"], s["sha256"]) for s in resumed["shards"]] == [
        (s["name"], s["sha256"]) for s in uninterrupted["shards"]
    ]


def test_a_truncated_shard_is_an_error_on_open_and_on_read(written, tmp_path):
    copy = shutil.copytree(written, tmp_path / "copy")
    opened = PairShards(copy)
    shard = json.loads((copy / MANIFEST_FILE).read_text())["shards"][0]
    path = copy / shard["name"]
    with path.open("r+b") as handle:
        handle.truncate(shard["bytes"] // 2)
    with pytest.raises(PairShardError, match=r"shards/alpha-00000\.tar .*truncated"):
        PairShards(copy)
    with pytest.raises(PairShardError, match=r"shards/alpha-00000\.tar.*ends \d+ bytes early"):
        opened[len(shard["samples"]) - 1]  # cut after it was opened: the last sample is gone


def test_a_damaged_byte_is_an_error_never_a_silent_skip(written, tmp_path):
    copy = shutil.copytree(written, tmp_path / "copy")
    shards = json.loads((copy / MANIFEST_FILE).read_text())["shards"]
    number = next(number for number, shard in enumerate(shards) if number and len(shard["samples"]) > 1)
    shard = shards[number]
    offset, size = shard["samples"][1]["members"]["teacher.png"]
    path = copy / shard["name"]
    content = bytearray(path.read_bytes())
    content[offset + size // 2] ^= 0x01
    path.write_bytes(bytes(content))
    pairs = PairShards(copy)  # the size is right: opening checks sizes only
    first_of_shard = sum(len(earlier["samples"]) for earlier in shards[:number])
    pairs[first_of_shard]  # the shard's other samples still read
    with pytest.raises(PairShardError, match=rf"{shard['name']}.*{shard['samples'][1]['key']}.*damaged"):
        pairs[first_of_shard + 1]
    with pytest.raises(PairShardError, match=rf"{shard['name']} .*sha256"):
        PairShards(copy, verify_sha256=True)
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(PairShardError, match="has not finished"):
        PairShards(copy)


def test_bad_inputs_stop_with_a_message_or_are_recorded_with_skip_errors(slides, tmp_path):
    missing = _xmag(str(_slide_list(slides, "nowhere.svs")), "--out", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "error: No file at" in missing.stderr, missing.stderr
    tenx = _xmag(str(_slide_list(slides, "tenx.svs")), "--out", str(tmp_path / "tenx"))
    assert tenx.returncode == 2 and "coarser than the teacher's 0.5 µm/px" in tenx.stderr, tenx.stderr
    assert "Traceback" not in missing.stderr + tenx.stderr
    assert not (tmp_path / "tenx" / MANIFEST_FILE).exists()

    mixed = _slide_list(slides, "tenx.svs", "nowhere.svs", "gamma.svs")
    skipped = _xmag(str(mixed), "--out", str(tmp_path / "mixed"), "--skip-errors", "--max-regions-per-slide", "2")
    assert skipped.returncode == 1 and "Traceback" not in skipped.stderr, skipped.stderr
    assert "1 written, 0 already current, 2 failed" in skipped.stdout and "failed: nowhere, tenx" in skipped.stdout
    log = [json.loads(line) for line in (tmp_path / "mixed" / "outcomes" / "rank-0.jsonl").read_text().splitlines()]
    assert [(entry["slide_id"], entry["status"], entry["code"]) for entry in log] == [
        ("tenx", "failed", "slide_too_coarse"),
        ("nowhere", "failed", "slide_not_found"),
        ("gamma", "done", ""),
    ]
    manifest = json.loads((tmp_path / "mixed" / MANIFEST_FILE).read_text())
    assert [slide["slide_id"] for slide in manifest["slides"]] == ["gamma"] and len(PairShards(tmp_path / "mixed")) == 2
