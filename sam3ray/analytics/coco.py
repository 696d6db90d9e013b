"""COCO instances export: the labels in the format every detection tool reads.

Why streamed: an output may hold more annotations than fit in memory, so the
JSON is written piece by piece from DuckDB record batches (images first, then
annotations, sorted so ids are reproducible) instead of building one dict.

Choices:
- Categories are the concepts, ``id`` 1..N by sorted class UUID (see
  ``sam3ray.analytics.categories``), the UUID kept as ``"class_id"``; filtering
  concepts keeps the ids, so exports of one output always agree.
- Images: every input with status ok (also those without detections: they are
  true negatives for evaluation), plus one image per video frame that has
  detections, carrying ``video_id`` and ``frame_index`` (a top-level ``videos``
  list names the videos). Image ids are 1..N by (image_id, frame_index).
- Segmentations stay compressed COCO RLE (``counts`` as str) at the image's size
  (a mask stored on a grid capped by ``inference.max_imgsz`` is scaled up to its
  image by nearest pixel, in a DuckDB UDF: COCO ties masks to images), bbox is the
  model's box as xywh, ``area`` the pixel count of the exported mask (so at the
  image's size too: COCOeval's small/medium/large ranges are in image pixels),
  ``iscrowd`` 0. Annotation ids run 1..M by category, image, then score
  (descending).
- ``results_path`` also writes the list form ``COCO.loadRes`` takes
  (image_id, category_id, segmentation, bbox, score), for ``COCOeval``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

from sam3ray.analytics import (
    batches,
    categories,
    connect,
    open_output,
    select_categories,
    stream,
)
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

_IMAGES_SQL = """
CREATE TEMP TABLE coco_images AS
WITH still AS (
    SELECT image_id, CAST(NULL AS INTEGER) AS frame_index, arg_max(uri, created_at) AS uri,
           arg_max(width, created_at) AS width, arg_max(height, created_at) AS height
    FROM img WHERE status = 'ok' AND frame_start IS NULL GROUP BY image_id),
frames AS (
    SELECT image_id, frame_index, any_value(uri) AS uri, any_value(width) AS width,
           any_value(height) AS height
    FROM det WHERE frame_index IS NOT NULL GROUP BY image_id, frame_index),
both_kinds AS (SELECT * FROM still UNION ALL SELECT * FROM frames)
SELECT row_number() OVER (ORDER BY image_id, frame_index NULLS FIRST) AS id,
       CASE WHEN frame_index IS NULL THEN NULL
            ELSE dense_rank() OVER (ORDER BY CASE WHEN frame_index IS NULL THEN NULL
                                                  ELSE image_id END) END AS video_id,
       image_id, frame_index, uri, width, height
FROM both_kinds
"""

# Annotations are serialised by DuckDB (json_object, in C++), ~20x faster than dicts and
# json.dumps per row; Python only prepends the running "id". A row without a mask (the
# engine never writes one) gets its box as a polygon, so COCO tools still load it. A mask
# on a capped grid is scaled once (``up``: counts and area); one at the image's size keeps
# its stored counts and area, without decoding.
_ANNOTATIONS_SQL = """
WITH rows AS (
    SELECT i.id AS image, round(d.score::DOUBLE, 6) AS score, d.mask_rle,
           coalesce(d.mask_size[1] = i.height AND d.mask_size[2] = i.width, false) AS same,
           d.mask_size AS ms, i.height AS h, i.width AS w,
           d.track_id, [round(d.box[k]::DOUBLE, 3) for k in [1, 2, 3, 4]] AS b,
           d.area::DOUBLE AS area
    FROM det AS d JOIN coco_images AS i
      ON d.image_id = i.image_id AND coalesce(d.frame_index, -1) = coalesce(i.frame_index, -1)
    WHERE d.class_id = $class_id AND d.score >= $min_score),
scaled AS (
    SELECT *, CASE WHEN mask_rle IS NOT NULL AND NOT same
                   THEN sam3ray_rle_at(mask_rle, ms, h, w) END AS up
    FROM rows),
parts AS (
    SELECT image, score, track_id,
           CASE WHEN mask_rle IS NULL
                THEN to_json([[b[1], b[2], b[3], b[2], b[3], b[4], b[1], b[4]]])
                WHEN same THEN json_object('size', [h, w], 'counts', decode(mask_rle))
                ELSE json_object('size', [h, w], 'counts', up.counts)
           END AS seg,
           [b[1], b[2], round(b[3] - b[1], 3), round(b[4] - b[2], 3)] AS bbox,
           coalesce(CASE WHEN mask_rle IS NULL OR same THEN area ELSE up.area::DOUBLE END,
                    (b[3] - b[1]) * (b[4] - b[2])) AS area
    FROM scaled)
SELECT json_object('image_id', image, 'category_id', $category_id, 'segmentation', seg,
                   'bbox', bbox, 'area', area, 'score', score, 'iscrowd', 0)::VARCHAR AS ann,
       json_object('image_id', image, 'category_id', $category_id, 'segmentation', seg,
                   'bbox', bbox, 'score', score)::VARCHAR AS res,
       track_id
FROM parts ORDER BY image, score DESC
"""


@dataclass(frozen=True)
class CocoExport:
    """What was written: counts, and the file URIs."""

    path: str
    images: int
    annotations: int
    categories: int
    results_path: str | None = None


def _register_rle_at(con: Any) -> None:
    """``sam3ray_rle_at(mask_rle, mask_size, h, w)``: a capped mask at the image's size,
    as ``{counts, area}``: one UDF call decodes and scales each mask once for both."""
    import duckdb
    from duckdb import sqltypes as t

    from sam3ray.core.masks import rle_at

    def at(counts: bytes, size: list[int], h: int, w: int) -> dict[str, Any]:
        scaled, area = rle_at(counts, size, (h, w))
        return {"counts": scaled.decode("ascii"), "area": area}

    con.create_function(
        "sam3ray_rle_at",
        at,
        [t.BLOB, duckdb.list_type(t.INTEGER), t.INTEGER, t.INTEGER],
        duckdb.struct_type({"counts": t.VARCHAR, "area": t.BIGINT}),
    )


def _basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def _image_entry(row: dict[str, Any]) -> dict[str, Any]:
    entry = {
        "id": row["id"],
        "file_name": _basename(row["uri"]),
        "uri": row["uri"],
        "width": row["width"],
        "height": row["height"],
        "sam3ray_image_id": row["image_id"],
    }
    if row["frame_index"] is not None:
        entry["video_id"] = row["video_id"]
        entry["frame_index"] = row["frame_index"]
    return entry


def _write_list(f: IO[str], first: bool, item: Any) -> None:
    f.write(("\n" if first else ",\n") + json.dumps(item, separators=(",", ":")))


def export_coco(
    output: Location,
    out: Location,
    *,
    concepts: Sequence[str] | None = None,
    min_score: float | None = None,
    results: Location | None = None,
) -> CocoExport:
    """Write ``out`` (COCO instances JSON) and optionally ``results_path`` (loadRes list).

    ``concepts``: names or class UUIDs to keep (default all); ``min_score``:
    drop detections scoring below it. Both files go through fsspec.
    """
    cats = select_categories(categories(output), concepts)
    by_class = {c.class_id: c.id for c in cats}
    con = connect(output)
    _register_rle_at(con)
    n_images = n_ann = 0
    try:
        con.execute(_IMAGES_SQL)
        videos = con.execute(
            "SELECT DISTINCT video_id, image_id, uri FROM coco_images "
            "WHERE video_id IS NOT NULL ORDER BY 1"
        ).fetchall()
        header = {
            "info": {"description": f"sam3ray labels of {output.uri}", "version": "1.0",
                     "date_created": datetime.now(timezone.utc).isoformat()},
            "licenses": [],
            "categories": [{"id": c.id, "name": c.name, "supercategory": "concept",
                            "class_id": c.class_id} for c in cats],
            "videos": [{"id": v, "sam3ray_image_id": i, "uri": u} for v, i, u in videos],
        }  # fmt: skip
        with open_output(out) as f:
            f.write(json.dumps(header)[:-1] + ',\n"images":[')
            for row in stream(con, "SELECT * FROM coco_images ORDER BY id"):
                _write_list(f, n_images == 0, _image_entry(row))
                n_images += 1
            f.write('\n],\n"annotations":[')
            if cats:
                n_ann = _write_annotations(con, f, by_class, min_score, results)
            f.write("\n]}\n")
    finally:
        con.close()
    logger.info("COCO: %d images, %d annotations, %d categories -> %s",
                n_images, n_ann, len(cats), out.uri)  # fmt: skip
    return CocoExport(out.uri, n_images, n_ann, len(cats), results.uri if results else None)


def _write_annotations(
    con: Any,
    f: IO[str],
    by_class: Mapping[str, int],
    min_score: float | None,
    results: Location | None,
) -> int:
    """Stream annotations into ``f`` (and the results file): one query per category, each
    sorted by image id then score, so a sort never spans more than one concept's rows.
    Annotation ids 1..M follow that order (category id, image id, score descending)."""
    floor = float(min_score) if min_score is not None else float("-inf")
    n = 0
    with contextlib.ExitStack() as stack:
        res = stack.enter_context(open_output(results)) if results is not None else None
        if res is not None:
            res.write("[")
        for class_id, category_id in sorted(by_class.items(), key=lambda kv: kv[1]):
            params = {"class_id": class_id, "min_score": floor, "category_id": category_id}
            for batch in batches(con, _ANNOTATIONS_SQL, params):
                tracks = batch.column("track_id").to_pylist()
                anns, lines, res_lines = batch.column("ann").to_pylist(), [], []
                for ann, res_json, track in zip(anns, batch.column("res").to_pylist(), tracks):
                    n += 1
                    if track is not None:
                        ann = f'{ann[:-1]},"track_id":{track}}}'
                    sep = "\n" if n == 1 else ",\n"
                    lines.append(f'{sep}{{"id":{n},{ann[1:]}')
                    res_lines.append(sep + res_json)
                f.write("".join(lines))
                if res is not None:
                    res.write("".join(res_lines))
        if res is not None:
            res.write("\n]\n")
    return n
