"""Turn a concept table plus a shard's exemplars into SAM 3 video prompts, and merge
what they find.

The video API prompts one frame per session run: ``add_prompt`` takes a text
and ONE box on that frame (its visual prompt, positive or negative; sam3 0.1.4
drops any further box of the call, so the planner refuses two boxes of a class
on one sampled frame: ``sources.prompts.check_video_exemplars``), and, after a
propagation, point clicks that add one object through the tracker. So, per
class, for the exemplars that fall inside the shard (``frame`` is shard-local):

- each text is one query per frame that carries a box of the class, or one
  query on frame 0 when the class has no box in the shard;
- a class without text gets one box-only ("visual") query per frame with a box;
- the points of one frame become one query that adds one object there.

Several queries of one class (synonyms, several prompted frames) find the same
objects: with ``inference.nms`` their tracks are merged by :func:`dedupe_tracks`
at ``inference.iou``, the video analogue of the image engine's per-class NMS;
then at most ``inference.max_det`` detections are kept per concept and frame.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sam3ray.config.schema import InferenceConfig
from sam3ray.core.types import ConceptSet, Detection, Exemplar, query_label

#: (x0, y0, x1, y1, positive) in original pixels.
Box = tuple[float, float, float, float, bool]


@dataclass(frozen=True)
class VideoQuery:
    """One prompt run over a whole shard."""

    class_id: str
    concept: str
    label: str  # the ``query`` column (core.types.query_label)
    text: str | None
    frame: int = 0  # shard-local frame the prompt is on
    boxes: tuple[Box, ...] = ()  # at most one: the visual prompt (positive or negative)
    points: tuple[tuple[float, float, bool], ...] = ()  # (x, y, positive) pixels
    min_score: float = 0.0


def build_video_queries(
    concepts: ConceptSet,
    exemplars: Mapping[str, Sequence[tuple[int, Exemplar]]] | None,
    conf: float,
    source_frames: Sequence[int] | None = None,
) -> list[VideoQuery]:
    """All queries of a shard, in concept-table order (deterministic).

    ``source_frames[i]`` is the source frame number of shard-local frame ``i``
    (for the ``@frame`` of the query label); by default local numbers are used.
    """
    queries: list[VideoQuery] = []
    exemplars = exemplars or {}

    def source(frame: int) -> int:
        return source_frames[frame] if source_frames is not None else frame

    for c in concepts:
        items = exemplars.get(c.class_id, ())
        boxes: dict[int, list[Box]] = defaultdict(list)
        points: dict[int, list[tuple[float, float, bool]]] = defaultdict(list)
        for f, e in items:
            if e.kind == "box":
                boxes[f].append((*e.coords, e.positive))  # type: ignore[arg-type]
            else:
                points[f].append((e.coords[0], e.coords[1], e.positive))
        min_score = c.min_score if c.min_score is not None else conf
        base = {"class_id": c.class_id, "concept": c.name, "min_score": min_score}
        framed = sorted(boxes.items())
        for f, bs in framed:
            if len(bs) > 1:
                raise ValueError(
                    f"class {c.class_id}: {len(bs)} boxes on shard frame {f}; the video "
                    "model takes one box per prompted frame"
                )
        for text in c.texts or (None,):
            if not framed and text is not None:
                queries.append(VideoQuery(**base, label=query_label(text), text=text))
            for f, bs in framed:
                kinds = [("box", b[4]) for b in bs]
                label = query_label(text, kinds, source(f))
                queries.append(VideoQuery(**base, label=label, text=text, frame=f, boxes=tuple(bs)))
        for f, pts in sorted(points.items()):
            label = query_label(None, [("point", p[2]) for p in pts], source(f))
            queries.append(VideoQuery(**base, label=label, text=None, frame=f, points=tuple(pts)))
    return queries


def dedupe_tracks(
    dets: Sequence[Detection], queries: Sequence[VideoQuery], iou: float
) -> list[Detection]:
    """Drop tracks of a later query that repeat a kept track of the same class.

    Two tracks repeat each other when their masks' IoU, averaged over the frames
    where both exist, is at least ``iou``. Queries are compared in order, so
    the result does not depend on dict or set ordering.
    """
    from sam3ray.core.masks import rle_iou

    order = {q.label: i for i, q in reversed(list(enumerate(queries)))}
    tracks: dict[int, list[Detection]] = defaultdict(list)
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


def cap_per_frame(dets: Sequence[Detection], max_det: int) -> list[Detection]:
    """At most ``max_det`` detections per concept and frame, best scores first (ties:
    earlier track); per concept, so a concept's tracks never depend on the others."""
    by_frame: dict[tuple[int | None, str], list[Detection]] = defaultdict(list)
    for d in dets:
        by_frame[(d.frame, d.class_id)].append(d)
    keep: set[int] = set()
    for items in by_frame.values():
        best = sorted(items, key=lambda d: (-d.score, d.track))[:max_det]
        keep.update(id(d) for d in best)
    return [d for d in dets if id(d) in keep]


def merge_tracks(
    dets: Sequence[Detection], queries: Sequence[VideoQuery], inference: InferenceConfig
) -> list[Detection]:
    """What ``inference.nms``, ``iou`` and ``max_det`` mean on a video shard."""
    out = list(dets)
    if inference.nms:
        out = dedupe_tracks(out, queries, inference.iou)
    return cap_per_frame(out, inference.max_det)
