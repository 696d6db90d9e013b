"""Video inputs and shard planning, without Ray or a model.

Videos are generated on the spot with PyAV (moving shapes, 144×192): every
container the job accepts, a frame folder, and the broken cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from sam3ray.config import InputConfig, VideoConfig
from sam3ray.core.ids import input_id
from sam3ray.core.shards import InputRef, Shard
from sam3ray.demo.videos import (
    truncated_copy,
    unknown_codec_copy,
    write_frame_folder,
    write_video,
)
from sam3ray.plan.shards import split_done
from sam3ray.plan.video import cut_videos, sampled_ranges
from sam3ray.sources.video import collapse_frame_folders, is_video_uri, probe_video
from sam3ray.storage.location import Location


def _ref(path) -> InputRef:
    return InputRef.of(str(path))


@dataclass
class _Marker:
    members_hash: str
    n_error: int = 0
    settings_hash: str = ""


def plan_video_shards(
    refs: Sequence[InputRef], cfg: VideoConfig, markers: Mapping, retry_errors: bool = False
) -> tuple[list[Shard], list[Shard]]:
    """Probe and cut, then split by the resume rule: what the planner does for videos."""
    source = InputConfig(uris=[r.uri for r in refs])
    return split_done(cut_videos(refs, source, cfg), markers, retry_errors)


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
    todo, skipped = plan_video_shards(refs, cfg, {})
    again, _ = plan_video_shards(list(reversed(refs)), cfg, {})
    assert todo == again and not skipped
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


def test_resume_skips_shards_whose_marker_matches_their_frames(videos):
    cfg = VideoConfig(shard_frames=16, overlap_frames=4)
    refs = [_ref(videos[".mp4"])]
    todo, _ = plan_video_shards(refs, cfg, {})
    markers = {s.shard_id: _Marker(s.members_hash) for s in todo[1:]}
    markers[todo[0].shard_id] = _Marker("stale")
    again, skipped = plan_video_shards(refs, cfg, markers)
    assert [s.shard_id for s in again] == [todo[0].shard_id]
    assert len(skipped) == len(todo) - 1
    markers[todo[1].shard_id] = _Marker(todo[1].members_hash, n_error=1)
    again, _ = plan_video_shards(refs, cfg, markers, retry_errors=True)
    assert todo[1].shard_id in {s.shard_id for s in again}
    changed, _ = plan_video_shards(refs, VideoConfig(shard_frames=20, overlap_frames=4), markers)
    assert len(changed) == len(plan_video_shards(refs, VideoConfig(shard_frames=20), {})[0])


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
    todo, _ = plan_video_shards([_ref(videos[key])], VideoConfig(), {})
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
