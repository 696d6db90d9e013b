"""Decoding one shard's frames: seek + forward decode, exact frames, bad streams."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sam3ray.core.errors import DecodeError
from sam3ray.demo.videos import truncated_copy, write_frame_folder, write_video
from sam3ray.sources.video import decode_frames, probe_video
from sam3ray.storage.location import Location


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    out = {ext: write_video(root / f"c{ext}", n_frames=72, gop=12) for ext in (".mp4", ".mkv")}
    out[".webm"] = write_video(root / "c.webm", n_frames=36, gop=12)
    out[".mov"] = write_video(root / "c.mov", n_frames=36, gop=12)
    return out


def _all_frames(path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


class _CountingAv:
    """``av`` with ``open`` wrapped so the test sees how many frames were decoded."""

    def __init__(self, av) -> None:
        self.av, self.decoded = av, 0

    def __getattr__(self, name):
        return getattr(self.av, name)

    def open(self, *args, **kwargs):
        outer, container = self, self.av.open(*args, **kwargs)

        class Proxy:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                container.close()

            def __getattr__(self, name):
                return getattr(container, name)

            def decode(self, *a, **k):
                for frame in container.decode(*a, **k):
                    outer.decoded += 1
                    yield frame

        return Proxy()


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".webm", ".mov"])
def test_a_late_shard_decodes_exactly_its_frames(clips, ext):
    loc = Location(str(clips[ext]))
    info = probe_video(loc)
    reference = _all_frames(clips[ext])
    assert len(reference) == info.n_frames
    wanted = list(range(info.n_frames - 14, info.n_frames, 2))
    got: dict[int, np.ndarray] = {}
    stamps = {}

    def keep(i, rgb, ts):
        got[i], stamps[i] = rgb, ts

    assert decode_frames(info, wanted, keep, loc) == wanted
    for i in wanted:
        np.testing.assert_array_equal(got[i], reference[i], err_msg=f"frame {i}")
        assert stamps[i] == pytest.approx(i / info.fps, abs=2e-3)


def test_seeking_decodes_from_the_keyframe_not_from_the_start(clips, monkeypatch):
    import av

    counting = _CountingAv(av)
    monkeypatch.setitem(__import__("sys").modules, "av", counting)
    loc = Location(str(clips[".mp4"]))
    info = probe_video(loc)
    decode_frames(info, list(range(60, 64)), lambda *a: None, loc)
    assert 4 <= counting.decoded <= 4 + 12 + 1, "at most one GOP before the first frame"


def test_off_grid_timestamps_are_a_variable_frame_rate_error(clips):
    loc = Location(str(clips[".mp4"]))
    info = dataclasses.replace(probe_video(loc), fps=25.0)
    with pytest.raises(DecodeError) as err:
        decode_frames(info, list(range(0, 40)), lambda *a: None, loc)
    assert err.value.reason == "variable_frame_rate"


def test_a_truncated_stream_delivers_fewer_frames_without_raising(clips, tmp_path):
    cut = truncated_copy(clips[".mkv"], tmp_path / "cut.mkv", keep=0.5)
    loc = Location(str(cut))
    info = probe_video(loc)
    assert info.n_frames == 72, "the header still claims the whole duration"
    done = decode_frames(info, list(range(0, 72, 4)), lambda *a: None, loc)
    assert 0 < len(done) < 18
    assert decode_frames(info, list(range(68, 72)), lambda *a: None, loc) == []


def test_frame_folder_frames_come_in_natural_order(tmp_path):
    folder = write_frame_folder(tmp_path / "cam.frames", n_frames=12)
    loc = Location(str(folder))
    info = probe_video(loc)
    assert info.n_frames == 12 and info.fps is None
    got = []
    decode_frames(info, [2, 10, 11], lambda i, rgb, ts: got.append((i, rgb.shape, ts)), loc)
    assert got == [(2, (144, 192, 3), None), (10, (144, 192, 3), None), (11, (144, 192, 3), None)]
