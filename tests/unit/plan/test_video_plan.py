"""Video inputs and shard planning, without Ray or a model.

Videos are generated on the spot with PyAV (moving shapes, 144×192): every
container the job accepts, a frame folder, and the broken cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sam3ray.config import InputConfig, JobConfig, VideoConfig
from sam3ray.core.errors import SettingsChanged
from sam3ray.core.ids import input_id
from sam3ray.core.shards import InputRef, Shard
from sam3ray.core.types import Concept, ConceptSet
from sam3ray.demo.videos import (
    truncated_copy,
    unknown_codec_copy,
    write_frame_folder,
    write_video,
)
from sam3ray.output.state import (
    bucket_of,
    commit_key,
    done_inputs,
    held_inputs,
    index_rows,
    task_row,
)
from sam3ray.plan.buckets import new_work, write_index
from sam3ray.plan.fingerprint import ConceptPrints
from sam3ray.plan.local import consolidate_locally, write_plan
from sam3ray.plan.shards import fresh_task
from sam3ray.plan.video import cut_videos, sampled_ranges
from sam3ray.sources.video import collapse_frame_folders, is_video_uri, probe_video
from sam3ray.storage.location import Location

CAT = "6f1c2a4e-1b7d-4c1e-9a55-0d7f1c3e2b01"


def _ref(path) -> InputRef:
    return InputRef.of(str(path))


def _prints() -> ConceptPrints:
    cfg = JobConfig.model_validate(
        {
            "input": {"uris": ["/data"]},
            "prompts": {"concepts": "/data/concepts.csv"},
            "model": {"checkpoint": "/m.pt"},
            "output": {"uri": "/labels"},
        }
    )
    return ConceptPrints(cfg, ConceptSet((Concept(CAT, "cat", ("cat",)),)))


def plan_video_shards(refs: Sequence[InputRef], cfg: VideoConfig) -> list[Shard]:
    """Probe and cut: what the planner does with new videos."""
    return cut_videos(refs, InputConfig(uris=[r.uri for r in refs]), cfg)


def new_videos(output: Location, refs: Sequence[InputRef], cfg: VideoConfig) -> list[Shard]:
    """The video shards a run plans for ``refs`` against what ``output`` holds."""
    source = InputConfig(uris=[r.uri for r in refs])
    shards = []
    for ref in refs:
        bucket = bucket_of(ref.image_id)
        held = held_inputs(output, bucket)
        _, tasks, _ = new_work(bucket, [ref], source, cfg, _prints(), held)
        shards += [t.shard for t in tasks]
    return shards


def commit_index(output: Location, run_id: str, shards: Sequence[Shard]) -> None:
    """What consolidation adds to the index when these video shards first commit."""
    rows = [r for s in shards for r in index_rows(task_row(fresh_task(s, _prints())))]
    write_index(output, run_id, rows)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    out = {ext: write_video(root / f"clip{ext}", n_frames=40) for ext in (".mp4", ".mov", ".mkv")}
    out[".webm"] = write_video(root / "clip.webm", n_frames=20)
    out["frames"] = write_frame_folder(root / "cam.frames", n_frames=12)
    out["vfr"] = write_video(root / "vfr.mp4", n_frames=20, variable_rate=True)
    out["codec"] = unknown_codec_copy(out[".mkv"], root / "codec.mkv")
    out["truncated"] = truncated_copy(out[".mp4"], root / "cut.mp4")
    (root / "zero.mp4").write_bytes(b"")
    out["zero"] = root / "zero.mp4"
    out["missing"] = root / "missing.mp4"
    (root / "none.frames").mkdir()
    (root / "none.frames" / "notes.txt").write_text("no frames here")
    out["no_frames"] = root / "none.frames"
    return out


@pytest.mark.parametrize(
    "n, frames, overlap", [(1, 8, 2), (8, 8, 2), (9, 8, 2), (40, 16, 4), (100, 64, 8), (7, 4, 3)]
)
def test_owned_ranges_partition_the_video_and_shards_stay_bounded(n, frames, overlap):
    ranges = sampled_ranges(n, frames, overlap)
    owned = []
    for start, stop, owned_stop in ranges:
        assert 0 < stop - start <= frames
        assert start <= owned_stop <= stop
        owned.extend(range(start, owned_stop))
    assert owned == list(range(n)), "every sampled frame owned exactly once"
    for (_, stop_a, _), (start_b, _, _) in zip(ranges, ranges[1:]):
        assert stop_a - start_b == overlap, "neighbours share exactly overlap_frames"
    assert ranges[-1][1] == n


def test_plan_cuts_each_container_into_deterministic_shards(videos):
    cfg = VideoConfig(shard_frames=16, overlap_frames=4, frame_stride=2)
    refs = [_ref(videos[k]) for k in (".mp4", ".mov", ".mkv", ".webm", "frames")]
    todo = plan_video_shards(refs, cfg)
    again = plan_video_shards(list(reversed(refs)), cfg)
    assert todo == again
    by_uri: dict[str, list] = {}
    for s in todo:
        assert s.kind == "video" and s.span.error_reason is None, s
        assert s.image_ids == (input_id(s.uris[0]),)
        by_uri.setdefault(s.uris[0], []).append(s.span)
        assert s.shard_id == f"v{input_id(s.uris[0])}-{s.span.frames[0]:07d}"
        assert all(b - a == 2 for a, b in zip(s.span.frames, s.span.frames[1:]))
    mp4 = by_uri[str(videos[".mp4"])]
    assert [s.owned for s in mp4] == [(0, 24), (24, 40)]  # 20 sampled frames, step 12
    assert mp4[0].info.n_frames == 40 and mp4[0].info.frames_exact
    mkv = by_uri[str(videos[".mkv"])][0].info
    assert mkv.n_frames == 40 and not mkv.frames_exact, "MKV has no count: from duration"
    folder = by_uri[str(videos["frames"])]
    assert folder[0].info.fps is None and folder[0].info.frame_uris[:3] == tuple(
        f"{videos['frames']}/{i}.jpg" for i in range(3)
    ), "natural order: 2.jpg before 10.jpg"


def test_a_video_is_done_once_every_one_of_its_shards_committed(videos, tmp_path):
    """The done-set counts a video's committed shards against its number of shards: a
    video with a shard missing is planned again with that shard only (shard ids follow
    from the cut, so committed ones are recognised), a whole one is never planned again,
    even with other cutting settings."""
    cfg = VideoConfig(shard_frames=16, overlap_frames=4)
    out = Location(str(tmp_path / "labels"))
    refs = [_ref(videos[".mp4"]), _ref(videos[".mov"])]
    first = new_videos(out, refs, cfg)
    assert len(first) == 6 and {s.span.n_shards for s in first} == {3}
    mp4 = [s for s in first if s.uris == (refs[0].uri,)]
    mov = [s for s in first if s.uris == (refs[1].uri,)]
    commit_index(out, "run-1", [*mp4, *mov[:2]])  # mov's last shard never committed
    assert new_videos(out, refs, cfg) == mov[2:]
    with pytest.raises(SettingsChanged, match="clip.mov is partly labelled"):
        new_videos(out, refs, VideoConfig(shard_frames=20, overlap_frames=4))
    commit_index(out, "run-2", [mov[2]])
    assert new_videos(out, refs, cfg) == []
    assert new_videos(out, refs, VideoConfig(shard_frames=20, overlap_frames=4)) == []


@pytest.mark.parametrize(
    "key, reason",
    [
        ("vfr", "variable_frame_rate"),
        ("codec", "unsupported_codec"),
        ("truncated", "corrupt"),  # moov atom at the end: cut off
        ("zero", "corrupt"),  # a zero-byte file
        ("no_frames", "empty"),
        ("missing", "not_found"),
    ],
)
def test_a_bad_video_becomes_one_error_shard_with_a_reason(videos, key, reason):
    todo = plan_video_shards([_ref(videos[key])], VideoConfig())
    assert len(todo) == 1
    shard = todo[0]
    span = shard.span
    assert span.error_reason == reason and span.error and span.info is None
    assert shard.shard_id.endswith("-0000000") and span.frames == ()


def test_video_uris_and_frame_folders_are_recognised():
    assert all(is_video_uri(u) for u in ("a.MP4", "s3://b/x.mov", "y.mkv", "z.webm", "c.frames/"))
    assert not any(is_video_uri(u) for u in ("a.jpg", "b.png", "c.frames/1.jpg", "mp4"))
    refs = [
        InputRef.of(u)
        for u in (
            "s3://b/cam.frames/2.jpg",
            "s3://b/cam.frames/10.jpg",
            "s3://b/x.jpg",
            "s3://b/v.mp4",
        )
    ]
    got = collapse_frame_folders(refs)
    assert [r.uri for r in got] == ["s3://b/cam.frames", "s3://b/v.mp4", "s3://b/x.jpg"]
    assert got[0].image_id == input_id("s3://b/cam.frames")


def test_probe_reads_through_fsspec_from_s3(moto_s3, videos):
    bucket = moto_s3.new_bucket("videos")
    uri = moto_s3.put(bucket, "clips/clip.mp4", videos[".mp4"].read_bytes())
    info = probe_video(Location(uri, moto_s3.storage_options))
    assert (info.n_frames, info.width, info.height, info.fps) == (40, 192, 144, 24.0)


def test_a_partly_committed_video_resumes_with_its_missing_shards_only(videos, tmp_path):
    """A run died between the shards of a video: the next runs label only the missing
    shards, and a dead rerun never touches what the earlier run committed."""
    cfg = VideoConfig(shard_frames=16, overlap_frames=4)
    out = Location(str(tmp_path / "labels"))
    ref = _ref(videos[".mp4"])
    source = InputConfig(uris=[ref.uri])
    bucket = bucket_of(ref.image_id)

    def plan_and_commit(run_id: str, commit: list[int]) -> list:
        held = held_inputs(out, bucket)
        _, tasks, _ = new_work(bucket, [ref], source, cfg, _prints(), held)
        write_plan(out, run_id, tasks)
        for k in commit:
            sid = tasks[k].shard_id
            out.child(f"images/part-{sid}.parquet").write_bytes(run_id.encode())
            out.child(commit_key(run_id, sid)).write_bytes(b"{}")
        consolidate_locally(out, run_id, 1000)
        return tasks

    first = plan_and_commit("20260101T000001Z-one", [0, 1])  # died before the last shard
    assert len(first) == 3 and ref.image_id not in done_inputs(out, bucket)
    again = plan_and_commit("20260101T000002Z-two", [])  # died before committing anything
    assert [t.shard_id for t in again] == [first[2].shard_id]
    assert all(t.first for t in again)
    for task in first[:2]:
        kept = out.child(f"images/part-{task.shard_id}.parquet")
        assert kept.read_bytes() == b"20260101T000001Z-one", "run one's shard lost its files"
    assert ref.image_id not in done_inputs(out, bucket)
    last = plan_and_commit("20260101T000003Z-three", [0])
    assert [t.shard_id for t in last] == [first[2].shard_id]
    assert ref.image_id in done_inputs(out, bucket)
    assert plan_and_commit("20260101T000004Z-four", []) == []
