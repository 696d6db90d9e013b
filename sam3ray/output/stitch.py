"""Join the tracks of a video's shards into one global ``track_id`` per object.

Shards are tracked independently, in any order, by any actor, so a shard can
only number its own tracks (local ids). Global ids are therefore computed
afterwards, per video, by a deterministic pure function of all its shards'
tracks (this module); ``output.video.stitch_video`` runs it once every shard
of the video has a commit marker and rewrites the ``track_id`` of the shards
whose ids changed. Because the result depends only on the shards' content,
redoing one shard and re-stitching gives the same ids wherever the evidence is
the same, in whatever order things ran.

Matching: for each pair of adjacent shards, on the frames both decoded (the
overlap), two tracks of the same class are compared by their *volume* mask IoU
(intersections summed over the overlap frames / unions summed): it weighs
every frame by its pixels and copes with a track missing from some frames.
Pairs at or above ``stitch_iou`` are matched one-to-one, best first. Matches
are edges of a union-find; since every edge links adjacent shards one-to-one,
a component holds at most one track per shard. Components are numbered
0, 1, … in order of (first source frame, shard index, local id).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: A track in a video: (shard index, local track id).
TrackKey = tuple[int, int]


@dataclass
class ShardTracks:
    """What stitching needs from one shard.

    ``first_frame``: local track -> first source frame where it is written (owned frames).
    ``overlap``: rows (frame, local track, class_id, mask_rle, mask_size) on frames
    shared with a neighbour. ``ok``: False for error shards (they break the chain).
    """

    index: int
    frames: tuple[int, ...]
    ok: bool = True
    first_frame: dict[int, int] = field(default_factory=dict)
    overlap: list[tuple[int, int, str, bytes, tuple[int, int]]] = field(default_factory=list)


def provisional_track_id(shard_index: int, local: int) -> int:
    """The id written before stitching: negative (so "not stitched" is visible) and
    unique within the video, so even an un-stitched output never merges two objects."""
    return -(shard_index * (1 << 20) + local + 1)


def volume_ious(
    a: Sequence[tuple[int, int, str, bytes, tuple[int, int]]],
    b: Sequence[tuple[int, int, str, bytes, tuple[int, int]]],
    frames: Iterable[int],
) -> dict[tuple[int, int], float]:
    """(track in a, track in b) -> volume IoU over ``frames``, same class only."""
    from pycocotools import mask as mask_utils

    frames = set(frames)
    inter: dict[tuple[int, int], float] = defaultdict(float)
    area_a: dict[int, float] = defaultdict(float)
    area_b: dict[int, float] = defaultdict(float)
    cls_a: dict[int, str] = {}
    cls_b: dict[int, str] = {}
    by_frame: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for rows, side, areas, classes in ((a, 0, area_a, cls_a), (b, 1, area_b, cls_b)):
        for frame, track, class_id, rle, size in rows:
            if frame not in frames:
                continue
            obj = {"counts": rle, "size": [int(size[0]), int(size[1])]}
            areas[track] += float(mask_utils.area(obj))
            classes[track] = class_id
            by_frame[frame][side].append((track, obj))
    for left, right in by_frame.values():
        if not left or not right:
            continue
        ious = np.asarray(
            mask_utils.iou([o for _, o in left], [o for _, o in right], [0] * len(right))
        )
        la = mask_utils.area([o for _, o in left])
        ra = mask_utils.area([o for _, o in right])
        for i, (ta, _) in enumerate(left):
            for j, (tb, _) in enumerate(right):
                iou = float(ious[i, j])
                if iou > 0:
                    inter[(ta, tb)] += iou * (la[i] + ra[j]) / (1.0 + iou)
    out = {}
    for (ta, tb), i in inter.items():
        if cls_a[ta] == cls_b[tb]:
            out[(ta, tb)] = i / max(area_a[ta] + area_b[tb] - i, 1e-9)
    return out


def match_tracks(ious: Mapping[tuple[int, int], float], threshold: float) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, best IoU first (ties by ids: deterministic)."""
    used_a: set[int] = set()
    used_b: set[int] = set()
    out = []
    for (ta, tb), iou in sorted(ious.items(), key=lambda kv: (-kv[1], kv[0])):
        if iou < threshold or iou <= 0 or ta in used_a or tb in used_b:
            continue
        used_a.add(ta)
        used_b.add(tb)
        out.append((ta, tb))
    return sorted(out)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[TrackKey, TrackKey] = {}

    def find(self, x: TrackKey) -> TrackKey:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x: TrackKey, y: TrackKey) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


def stitch(shards: Sequence[ShardTracks], threshold: float) -> dict[TrackKey, int]:
    """Global id for every written track of a video: {(shard index, local id): track_id}."""
    by_index = {s.index: s for s in shards}
    uf = _UnionFind()
    for s in shards:
        for local in s.first_frame:
            uf.find((s.index, local))
    for s in shards:
        nxt = by_index.get(s.index + 1)
        if nxt is None or not (s.ok and nxt.ok):
            continue
        shared = set(s.frames) & set(nxt.frames)
        if not shared:
            continue
        for ta, tb in match_tracks(volume_ious(s.overlap, nxt.overlap, shared), threshold):
            uf.union((s.index, ta), (nxt.index, tb))
    members: dict[TrackKey, list[TrackKey]] = defaultdict(list)
    for s in shards:
        for local in s.first_frame:
            members[uf.find((s.index, local))].append((s.index, local))
    first = {
        root: min((by_index[i].first_frame[t], i, t) for i, t in keys)
        for root, keys in members.items()
    }
    ids = {root: n for n, root in enumerate(sorted(members, key=lambda r: first[r]))}
    return {key: ids[root] for root, keys in members.items() for key in keys}
