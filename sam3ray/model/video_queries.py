"""Turn a concept table plus a shard's exemplars into SAM 3 video prompts.

The video API takes one prompt per session run: a text, optionally with ONE
box on one frame (``add_prompt`` on a fresh session accepts exactly one box,
its visual prompt), and, after a propagation, point clicks that add one
object through the tracker. So, per class, for the exemplars that fall
inside the shard (``frame`` is shard-local):

- each text is one query, combined with the class's earliest positive box
  (on that box's frame; otherwise the query starts on frame 0);
- a class without text gets one box-only ("visual") query per positive box;
- the points of one frame become one query that adds one object there;
- negative boxes cannot be expressed in the video API: ignored, with a warning.

Several queries of one class (synonyms) find the same objects: their tracks
are merged by :func:`dedupe_tracks`, the video analogue of the image
engine's per-class NMS.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sam3ray.types import ConceptSet, Exemplar

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoQuery:
    """One prompt run over a whole shard."""

    class_id: str
    concept: str
    label: str  # the ``query`` column, e.g. 'text:"car"+box@3'
    text: str | None
    frame: int = 0
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 pixels
    points: tuple[tuple[float, float, bool], ...] = ()  # (x, y, positive) pixels
    min_score: float = 0.0


def build_video_queries(
    concepts: ConceptSet,
    exemplars: Mapping[str, Sequence[tuple[int, Exemplar]]] | None,
    conf: float,
) -> list[VideoQuery]:
    """All queries of a shard, in concept-table order (deterministic)."""
    queries: list[VideoQuery] = []
    exemplars = exemplars or {}
    for c in concepts:
        items = sorted(exemplars.get(c.class_id, ()), key=lambda fe: fe[0])
        boxes = [(f, e) for f, e in items if e.kind == "box" and e.positive]
        if any(e.kind == "box" and not e.positive for _, e in items):
            logger.warning("class %s: negative boxes are not supported for video: ignored", c.name)
        min_score = c.min_score if c.min_score is not None else conf
        base = {"class_id": c.class_id, "concept": c.name, "min_score": min_score}
        for text in c.texts:
            if boxes:
                f, e = boxes[0]
                label = f'text:"{text}"+box@{f}'
                queries.append(VideoQuery(**base, label=label, text=text, frame=f, box=e.coords))
            else:
                queries.append(VideoQuery(**base, label=f'text:"{text}"', text=text))
        if not c.texts:
            for f, e in boxes:
                queries.append(
                    VideoQuery(**base, label=f"visual+box@{f}", text=None, frame=f, box=e.coords)
                )
        by_frame: dict[int, list[tuple[float, float, bool]]] = defaultdict(list)
        for f, e in items:
            if e.kind == "point":
                by_frame[f].append((e.coords[0], e.coords[1], e.positive))
        for f, pts in sorted(by_frame.items()):
            n_pos = sum(p[2] for p in pts)
            label = f"points:+{n_pos}-{len(pts) - n_pos}@{f}"
            queries.append(VideoQuery(**base, label=label, text=None, frame=f, points=tuple(pts)))
    return queries


def dedupe_tracks(dets: Sequence[Any], queries: Sequence[VideoQuery], iou: float) -> list[Any]:
    """Drop tracks of a later query that repeat a kept track of the same class.

    Two tracks repeat each other when their masks' IoU, averaged over the frames
    where both exist, is at least ``iou``. Queries are compared in order, so
    the result does not depend on dict or set ordering.
    """
    from sam3ray.masks import rle_iou

    order = {q.label: i for i, q in reversed(list(enumerate(queries)))}
    tracks: dict[int, list[Any]] = defaultdict(list)
    for d in dets:
        tracks[d.track].append(d)
    ranked = sorted(tracks, key=lambda t: (order.get(tracks[t][0].query, 0), t))
    kept: list[int] = []
    for t in ranked:
        mine = {d.frame: d for d in tracks[t]}
        cls, query = tracks[t][0].class_id, tracks[t][0].query
        duplicate = False
        for k in kept:
            other = tracks[k]
            if other[0].class_id != cls or other[0].query == query:
                continue
            ious = [
                rle_iou(mine[o.frame].mask_rle, o.mask_rle, o.mask_size)
                for o in other
                if o.frame in mine
            ]
            if ious and sum(ious) / len(ious) >= iou:
                duplicate = True
                break
        if not duplicate:
            kept.append(t)
    keep = set(kept)
    return [d for d in dets if d.track in keep]
