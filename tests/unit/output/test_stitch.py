"""Global track ids across shards: the pure algorithm and the per-video rewrite pass.

Tracks are synthetic rectangles (no model), so every expectation is exact.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict

import numpy as np
import pytest

from sam3ray.core.ids import video_shard_id
from sam3ray.core.masks import encode_rle
from sam3ray.core.shards import Shard, VideoInfo, VideoSpan
from sam3ray.output.layout import staging_path
from sam3ray.output.markers import scan_markers
from sam3ray.output.readers import detections_dataset, images_dataset
from sam3ray.output.schema import detections_table, images_table
from sam3ray.output.stitch import ShardTracks, provisional_track_id, stitch
from sam3ray.output.video import owned_rows, stitch_video, write_staging
from sam3ray.output.writer import ShardOutput, ShardWriter
from sam3ray.storage.location import Location

CAR = "0b0c7f5e-0000-4000-8000-0000000000c1"
DOG = "0b0c7f5e-0000-4000-8000-0000000000d2"
H, W = 48, 64
# 28 frames, shards of 12 with overlap 4: frames [0,12) [8,20) [16,28); owned [0,8) [8,16) [16,28)
SHARDS = [(0, tuple(range(0, 12)), (0, 8)), (1, tuple(range(8, 20)), (8, 16)),
          (2, tuple(range(16, 28)), (16, 28))]  # fmt: skip


def _rle(frame: int, x0: int, width: int = 12) -> tuple[bytes, int]:
    m = np.zeros((H, W), bool)
    x = (x0 + frame) % (W - width)
    m[10:30, x : x + width] = True
    return encode_rle(m)


def _tracks(objects: dict[int, list[tuple[int, str, int]]], ok=(True, True, True)):
    """objects: shard index -> [(local id, class, x0)], present on all the shard's frames."""
    out = []
    for (index, frames, (lo, _)), good in zip(SHARDS, ok):
        st = ShardTracks(index, frames, ok=good)
        if good:
            for local, cls, x0 in objects.get(index, []):
                st.first_frame[local] = lo
                for f in frames:
                    st.overlap.append((f, local, cls, _rle(f, x0)[0], (H, W)))
        out.append(st)
    return out


def test_an_object_crossing_two_boundaries_keeps_one_id_and_classes_never_mix():
    objects = {
        0: [(0, CAR, 0), (1, DOG, 30)],
        1: [(5, DOG, 30), (7, CAR, 0)],  # local ids differ from shard 0: only masks count
        2: [(0, CAR, 0), (1, CAR, 30)],  # same place as the dog, other class: a new object
    }
    ids = stitch(_tracks(objects), 0.5)
    assert ids[(0, 0)] == ids[(1, 7)] == ids[(2, 0)]
    assert ids[(0, 1)] == ids[(1, 5)] != ids[(2, 1)]
    assert sorted(set(ids.values())) == [0, 1, 2], "dense ids from 0"
    assert ids[(0, 0)] == 0 and ids[(2, 1)] == 2, "numbered by first frame, then shard, then id"


def test_result_is_independent_of_order_and_ids_are_deterministic():
    objects = {0: [(0, CAR, 0), (1, CAR, 40)], 1: [(0, CAR, 40), (1, CAR, 0)], 2: [(3, CAR, 0)]}
    want = stitch(_tracks(objects), 0.5)
    for perm in itertools.permutations(_tracks(objects)):
        assert stitch(list(perm), 0.5) == want


def test_threshold_and_an_error_shard_break_the_chain():
    objects = {0: [(0, CAR, 0)], 1: [(0, CAR, 3)], 2: [(0, CAR, 6)]}  # 3 px shifts of a 12 px box
    assert len(set(stitch(_tracks(objects), 0.5).values())) == 1
    assert len(set(stitch(_tracks(objects), 0.9).values())) == 3
    broken = stitch(_tracks(objects, ok=(True, False, True)), 0.5)
    assert broken[(0, 0)] != broken[(2, 0)]


def test_provisional_ids_are_negative_and_unique_per_video():
    got = {provisional_track_id(s, t) for s in range(50) for t in range(200)}
    assert len(got) == 50 * 200 and max(got) < 0


# --------------------------------------------------------------------------- the rewrite pass


VIDEO = "00aa11bb22cc33dd"
#: Per-concept fingerprints the shards were labelled with (kept by every rewrite).
PRINTS = ((CAR, "fp-car"), (DOG, "fp-dog"))
INFO = VideoInfo("/v.mp4", 28, 24.0, W, H, True, "h264")


def _shard(index: int) -> Shard:
    """Shard ``index`` of the test video, as the planner cuts it."""
    _, frames, owned = SHARDS[index]
    span = VideoSpan(index, len(SHARDS), frames, owned, INFO)
    return Shard(
        shard_id=video_shard_id(VIDEO, frames[0]),
        kind="video",
        uris=("/v.mp4",),
        image_ids=(VIDEO,),
        span=span,
    )


def _commit(out: Location, index: int, objects, run_id: str = "run") -> Shard:
    """Commit one tracked shard as the track and commit stages do: staging (every decoded
    frame, local ids), then its owned rows with provisional ids, images row, marker."""
    shard = _shard(index)
    _, frames, owned = SHARDS[index]
    rows = []
    for local, cls, x0 in objects:
        for f in frames:
            rle, area = _rle(f, x0)
            rows.append({
                "run_id": run_id, "image_id": VIDEO, "uri": "/v.mp4", "frame_index": f,
                "timestamp_s": f / 24, "track_id": local, "class_id": cls, "concept": cls[-2:],
                "query": "q", "score": 0.9, "box": [0, 0, 1, 1], "mask_rle": rle,
                "mask_size": [H, W], "area": area, "width": W, "height": H, "model": "m",
            })  # fmt: skip
    staging = detections_table(rows)
    det = owned_rows(staging, owned, index)
    img = {"run_id": run_id, "image_id": VIDEO, "uri": "/v.mp4", "shard_id": shard.shard_id,
           "frame_start": owned[0], "frame_end": owned[1], "status": "ok",
           "n_detections": det.num_rows, "width": W, "height": H}  # fmt: skip
    write_staging(out, shard.shard_id, staging)
    commit = ShardOutput(shard.shard_id, run_id, det, images_table([img]), prints=PRINTS)
    ShardWriter(out).write(commit)
    return shard


def _read_ids(out: Location) -> dict[tuple[int, str], set[int]]:
    got = defaultdict(set)
    for r in detections_dataset(out).to_table().to_pylist():
        got[(r["frame_index"], str(r["class_id"]))].add(r["track_id"])
    return got


@pytest.fixture()
def written(tmp_path):
    out = Location(str(tmp_path / "out"))
    shards = [_commit(out, 0, [(0, CAR, 0)]), _commit(out, 1, [(4, CAR, 0)]),
              _commit(out, 2, [(9, CAR, 0)])]  # fmt: skip
    return out, VIDEO, shards


def test_stitch_rewrites_global_ids_once_and_is_then_a_no_op(written):
    out, _, shards = written
    before = _read_ids(out)
    assert all(min(ids) < 0 for ids in before.values()), "provisional ids before stitching"
    assert stitch_video(out, shards, 0.5)["rewritten"] == 3
    after = _read_ids(out)
    assert set(after) == set(before), "each (frame, object) exactly once"
    assert {i for ids in after.values() for i in ids} == {0}
    assert stitch_video(out, shards, 0.5)["status"] == "up_to_date"
    images = images_dataset(out).to_table().to_pylist()
    assert sorted((r["frame_start"], r["frame_end"]) for r in images) == [(0, 8), (8, 16), (16, 28)]


def test_redoing_one_shard_restitches_the_video_to_the_same_ids(written, tmp_path):
    out, video, shards = written
    stitch_video(out, shards, 0.5)
    want = _read_ids(out)
    _commit(out, 1, [(2, DOG, 40), (3, CAR, 0)])  # new local ids, one more object
    result = stitch_video(out, shards, 0.5)
    assert result["status"] == "stitched" and result["rewritten"] == 1, "only the redone shard"
    got = _read_ids(out)
    assert {k: v for k, v in got.items() if k[1] == CAR} == want
    assert {i for k, v in got.items() if k[1] == DOG for i in v} == {1}
    # a crash before the stitch record was written: the next pass converges to the same ids
    record = tmp_path / "out" / "_video" / "stitch" / f"{video}.json"
    record.write_text(json.dumps({"shards": {}}))
    stitch_video(out, shards, 0.5)
    assert _read_ids(out) == got


def _labels(out: Location) -> list[dict]:
    """Every detection row without its track id, in a fixed order."""
    table = detections_dataset(out).to_table().drop_columns(["track_id", "created_at"])
    return sorted(table.to_pylist(), key=lambda r: (r["frame_index"], r["class_id"]))


def test_a_new_stitch_iou_restitches_from_staging_without_retracking(tmp_path):
    """3 px shifts of a 12 px box: overlap IoU 0.6, one object at 0.5, three at 0.9."""
    out = Location(str(tmp_path / "out"))
    shards = [_commit(out, i, [(0, CAR, 3 * i)]) for i in range(3)]
    stitch_video(out, shards, 0.5)
    assert {i for ids in _read_ids(out).values() for i in ids} == {0}
    staging = {s.shard_id: out.child(staging_path(s.shard_id)).read_bytes() for s in shards}
    markers, labels = scan_markers(out), _labels(out)

    result = stitch_video(out, shards, 0.9)
    assert result["status"] == "stitched" and result["tracks"] == 3
    assert result["rewritten"] == 2, "shard 0 keeps its ids: only its neighbours change"
    by_frame = {f: ids for (f, _), ids in _read_ids(out).items()}
    assert [by_frame[f] for f in (0, 8, 16)] == [{0}, {1}, {2}]
    # Not re-tracked: staging untouched, the same detections, files, fingerprints and run.
    assert {s.shard_id: out.child(staging_path(s.shard_id)).read_bytes() for s in shards} == (
        staging
    )
    assert _labels(out) == labels
    after = scan_markers(out)
    assert {k: (m.prints, m.run_id, m.files) for k, m in after.items()} == {
        k: (m.prints, m.run_id, m.files) for k, m in markers.items()
    }
    assert all(m.prints == PRINTS for m in after.values())
    record = json.loads(out.child(f"_video/stitch/{VIDEO}.json").read_bytes())
    assert record["stitch_iou"] == 0.9
    assert stitch_video(out, shards, 0.9)["status"] == "up_to_date"
    assert stitch_video(out, shards, 0.5)["status"] == "stitched"
    assert {i for ids in _read_ids(out).values() for i in ids} == {0}
