"""The video job end to end on real local Ray: plan → track → commit → stitch → resume.

Videos are generated in the test (moving shapes, 144×192) and tracked by the
tiny random-weight SAM 3 video model, through ``run_job`` like any job.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pyarrow.parquet as pq

from sam3ray.config import JobConfig
from sam3ray.core.ids import input_id
from sam3ray.demo.videos import unknown_codec_copy, write_video
from sam3ray.output.layout import staging_path
from sam3ray.output.readers import detections_dataset, images_dataset
from sam3ray.output.stitch import match_tracks, volume_ious
from sam3ray.runner.job import run_job
from sam3ray.storage.location import Location

DISC = "0b0c7f5e-0000-4000-8000-0000000000a1"
STITCH_IOU = 0.3  # random-weight masks of one object agree at IoU ~0.44 on overlaps


def _job(tmp_path, ckpt: str, uris: list[str]) -> JobConfig:
    concepts = tmp_path / "concepts.csv"
    concepts.write_text(f"class_id,name,text\n{DISC},disc,blue disc\n")
    return JobConfig.model_validate(
        {
            "input": {"uris": uris},
            "prompts": {"concepts": str(concepts)},
            "model": {"checkpoint": ckpt, "device": "cpu", "dtype": "float32"},
            "inference": {"conf": 0.0},
            "resources": {"gpus_per_actor": 0, "cpus_per_actor": 0.5, "actors": [1, 2]},
            "output": {"uri": str(tmp_path / "out")},
            "video": {"shard_frames": 20, "overlap_frames": 6, "stitch_iou": STITCH_IOU},
        }
    )


def _table(out: str) -> list[tuple]:
    rows = detections_dataset(Location(out)).to_table().to_pylist()
    return sorted((r["image_id"], r["frame_index"], r["track_id"], r["mask_rle"]) for r in rows)


def test_video_job_owns_every_frame_once_stitches_tracks_and_resumes(
    ray_session, tmp_path, video_ckpt
):
    root = tmp_path / "videos"
    root.mkdir()
    good = [str(write_video(root / "a.mp4", 56)), str(write_video(root / "b.mkv", 40))]
    bad = {
        str(write_video(root / "vfr.mp4", 20, variable_rate=True)): "variable_frame_rate",
        str(unknown_codec_copy(good[1], root / "codec.mkv")): "unsupported_codec",
    }
    cfg = _job(tmp_path, video_ckpt, [str(root)])
    out = cfg.output.uri

    first = run_job(cfg)
    stats = first["videos"]
    assert first["shards"]["done_now"] == stats["shards_done_now"] == 4 + 3 + 2
    assert stats["new"] == 4 and first["plan"]["inputs"]["done"] == 0
    assert stats["stitch"].get("stitched") == 4, stats  # error videos: an empty record
    loads = first["actors"]["model_loads_per_actor"]
    assert loads and set(loads) == {1}, "the model is loaded once per actor"

    images = images_dataset(Location(out)).to_table().to_pylist()
    errors = {r["uri"]: r["error_reason"] for r in images if r["status"] == "error"}
    assert errors == bad
    for uri, n in zip(good, (56, 40)):
        spans = sorted((r["frame_start"], r["frame_end"]) for r in images if r["uri"] == uri)
        owned = [f for lo, hi in spans for f in range(lo, hi)]
        assert owned == list(range(n)), "every frame owned by exactly one shard"

    dets = detections_dataset(Location(out)).to_table().to_pylist()
    keys = [(d["image_id"], d["frame_index"], d["track_id"]) for d in dets]
    assert len(keys) == len(set(keys)), "each (video, frame, object) appears once"
    assert dets and all(d["track_id"] >= 0 for d in dets), "every id is a stitched global id"
    _assert_matched_tracks_share_ids(out, images, dets)

    before = _table(out)
    again = run_job(cfg)
    assert again["inputs_processed"] == 0 and again["actors"]["count"] == 0
    assert _table(out) == before

    # A new video is tracked alone; the others are left as they are.
    third = str(write_video(root / "c.mp4", 30))
    more = run_job(cfg)
    assert more["videos"]["new"] == 1 and more["shards"]["done_now"] == 2
    assert more["videos"]["stitch"] == {"stitched": 1, "rewritten_shards": 2}, more["videos"]
    after = _table(out)
    assert [r for r in after if r[0] != input_id(third)] == before
    assert {r[0] for r in after} == {input_id(u) for u in (*good, third)}

    # An edited concept (a new min_score) relabels that concept on every video shard and
    # restitches; the tracks of other concepts would stay (here there is one concept).
    edited = tmp_path / "concepts-edited.csv"
    edited.write_text(f"class_id,name,text,min_score\n{DISC},disc,blue disc,0.0001\n")
    cfg = cfg.model_copy(update={"prompts": cfg.prompts.model_copy(
        update={"concepts": str(edited)})})  # fmt: skip
    relabel = run_job(cfg)
    assert relabel["shards"]["relabelled"] == 4 + 3 + 2 + 2 and relabel["shards"]["new"] == 0
    images = images_dataset(Location(out)).to_table().to_pylist()
    it_errors = {r["uri"]: r["error_reason"] for r in images if r["status"] == "error"}
    assert it_errors == bad, "error shards stay errors"

    # A new stitch_iou re-stitches every video from its record, without tracking again.
    restitch = run_job(cfg.model_copy(update={"video": cfg.video.model_copy(
        update={"stitch_iou": 0.99})}))  # fmt: skip
    assert restitch["shards"]["done_now"] == 0 and restitch["actors"]["count"] == 0
    assert restitch["videos"]["stitch"].get("stitched") == 5, restitch["videos"]


def _assert_matched_tracks_share_ids(out, images, dets) -> None:
    """Where the stitcher's own rule matches two shards' tracks, their global ids agree;
    and the test is not vacuous: at least one object crosses a shard boundary."""
    global_of = {}
    for d in dets:
        global_of[(d["image_id"], d["frame_index"], d["mask_rle"])] = d["track_id"]
    by_video = defaultdict(list)
    for r in images:
        if r["status"] == "ok":
            by_video[r["image_id"]].append(r)
    crossings = 0
    for shards in by_video.values():
        shards.sort(key=lambda r: r["frame_start"])
        tables = [pq.read_table(os.path.join(out, staging_path(r["shard_id"]))) for r in shards]
        for (a, ra), (b, rb) in zip(zip(tables, shards), zip(tables[1:], shards[1:])):
            rows_a, rows_b = _rows(a), _rows(b)
            shared = {f for f, *_ in rows_a} & {f for f, *_ in rows_b}
            for ta, tb in match_tracks(volume_ious(rows_a, rows_b, shared), STITCH_IOU):
                ga = {global_of.get((ra["image_id"], f, m)) for f, t, _, m, _ in rows_a if t == ta}
                gb = {global_of.get((rb["image_id"], f, m)) for f, t, _, m, _ in rows_b if t == tb}
                ga.discard(None), gb.discard(None)
                if ga and gb:
                    assert ga == gb and len(ga) == 1
                    crossings += 1
    assert crossings > 0, "no object crossed a shard boundary: a vacuous check"


def _rows(table):
    cols = ["frame_index", "track_id", "class_id", "mask_rle", "mask_size"]
    return [
        (f, t, c, m, tuple(s))
        for f, t, c, m, s in zip(*(table.column(n).to_pylist() for n in cols))
    ]
