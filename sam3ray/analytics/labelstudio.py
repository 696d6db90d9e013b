"""Label Studio pre-annotation tasks: SAM 3's masks as editable predictions.

Why our own brush encoder: Label Studio's brush tool stores masks in its own
bit-packed RLE of an RGBA image (``label_studio_converter.brush.encode_rle``),
not COCO RLE. That converter is a slow pure-Python bit-string loop and pulls
in a large dependency tree, so the same format is implemented here with numpy
(byte-identical output; the tests compare against the converter's algorithm).

Format, for an array of ``num`` uint8 values (the mask, row-major, each pixel
repeated 4 times for R, G, B, A; 255 inside): a header of ``num`` (32 bits),
``wordsize - 1`` (5 bits, 7) and the four run-length field widths minus one
(4 bits each: 3, 4, 8, 16 -> 2, 3, 7, 15); then per run of equal values a token
``flag(1) width_index(2) length-1 value(8)``: flag 0 with width 3 and length 1
for a single value, flag 1 for a run, using the smallest width that fits (runs
over 256 always use 16 bits, split into pieces of 65536); zero bits pad to the
next byte, a whole zero byte if already aligned.

Polygons (``fmt="polygon"``) are the outer contours of the mask in percent of
the image size; holes cannot be expressed as Label Studio polygons and are
dropped. Video detections are left out: Label Studio's video tasks are another
format.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np

from sam3ray.analytics import (
    Category,
    categories,
    connect,
    open_output,
    select_categories,
    sql_list,
    stream,
)
from sam3ray.core.masks import decode_rle, mask_to_polygons
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

_FULL = 1 << 16  # the longest piece a 16-bit length field holds
_HEADER_TAIL = (7 << 16) | (2 << 12) | (3 << 8) | (7 << 4) | 15  # wordsize 8, widths 3,4,8,16

_TASKS_SQL = """
WITH still AS (
    SELECT image_id, arg_max(uri, created_at) AS uri, arg_max(width, created_at) AS width,
           arg_max(height, created_at) AS height
    FROM img WHERE status = 'ok' AND frame_start IS NULL GROUP BY image_id),
d AS (SELECT image_id, class_id, score, mask_rle, mask_size, model FROM det
      WHERE frame_index IS NULL AND class_id IN {classes} AND score >= ?)
SELECT s.image_id, s.uri, s.width, s.height, d.class_id, d.score, d.mask_rle, d.mask_size, d.model
FROM still AS s LEFT JOIN d ON s.image_id = d.image_id
ORDER BY s.image_id, d.class_id, d.score DESC
"""


def _bits(codes: np.ndarray, nbits: np.ndarray) -> np.ndarray:
    """Concatenate the low ``nbits[i]`` (<= 32) bits of ``codes[i]``, most significant first."""
    matrix = np.unpackbits(codes.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)
    return matrix[np.arange(32)[None, :] >= (32 - nbits)[:, None]]


def encode_values(values: np.ndarray) -> list[int]:
    """Label Studio RLE of a 1-D uint8 array (``brush.encode_rle(values)``)."""
    values = np.asarray(values, dtype=np.uint8).ravel()
    if values.size == 0:
        raise ValueError("nothing to encode")
    ends = np.append(np.flatnonzero(values[1:] != values[:-1]), values.size - 1)
    lengths = np.diff(np.append(-1, ends))
    return _pack(values.size, lengths, values[ends])


def _pack(num: int, lengths: np.ndarray, values: np.ndarray) -> list[int]:
    lengths = lengths.astype(np.int64)
    values = values.astype(np.uint64)
    long = lengths > 256
    pieces = np.where(long, (lengths - 1) // _FULL + 1, 1)
    run_len, run_val, run_long = (np.repeat(a, pieces) for a in (lengths, values, long))
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    index = np.arange(run_len.size) - first  # piece number within its run
    last = index == np.repeat(pieces - 1, pieces)
    piece = np.where(run_long & ~last, _FULL, run_len - (pieces.repeat(pieces) - 1) * _FULL)
    size_idx = np.select([run_long, run_len > 16, run_len > 8], [3, 2, 1], 0)
    width = np.array([3, 4, 8, 16], dtype=np.uint64)[size_idx]
    flag = (run_len > 1).astype(np.uint64)
    field = (piece - 1).astype(np.uint64)
    codes = (flag << (width + np.uint64(10))) | (
        size_idx.astype(np.uint64) << (width + np.uint64(8))
    )
    codes |= (field << np.uint64(8)) | run_val
    body = _bits(codes, (width + 11).astype(np.int64))
    header = _bits(np.array([num, _HEADER_TAIL]), np.array([32, 21]))
    pad = 8 - (header.size + body.size) % 8
    stream_bits = np.concatenate([header, body, np.zeros(pad, np.uint8)])
    return np.packbits(stream_bits).tolist()


def encode_brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a boolean H x W mask (``brush.mask2rle(mask * 255)``)."""
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        raise ValueError("empty mask")
    ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)
    lengths = np.diff(np.append(-1, ends)) * 4  # each pixel is 4 RGBA values
    return _pack(flat.size * 4, lengths, flat[ends].astype(np.uint8) * 255)


def decode_values(rle: Sequence[int] | bytes) -> np.ndarray:
    """Inverse of :func:`encode_values` (``brush.decode_rle``): the flat uint8 values."""
    bits = np.unpackbits(np.frombuffer(bytes(rle), dtype=np.uint8))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        value = int("".join(map(str, bits[pos : pos + n])) or "0", 2)
        pos += n
        return value

    num, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        run = read(1)
        j = i + 1 + read(sizes[read(2)])
        if run:
            out[i:j] = read(word)
        else:
            out[i:j] = [read(word) for _ in range(j - i)]
        i = j
    return out


def brush_rle_to_mask(rle: Sequence[int] | bytes, height: int, width: int) -> np.ndarray:
    """Boolean H x W mask of a brush RLE (alpha channel > 0, as Label Studio draws it)."""
    return decode_values(rle).reshape(height, width, 4)[..., 3] > 0


def mask_to_percent_polygons(mask: np.ndarray, tolerance: float = 1.0) -> list[list[list[float]]]:
    """Outer contours as ``[[x%, y%], ...]`` (0..100): Label Studio's polygon units."""
    h, w = mask.shape
    return [
        np.round(np.asarray(flat).reshape(-1, 2) * [100 / w, 100 / h], 4).tolist()
        for flat in mask_to_polygons(mask, tolerance)
    ]


def labeling_config(
    cats: Sequence[Category], fmt: str = "rle", from_name: str = "label", to_name: str = "image"
) -> str:
    """A Label Studio labelling config matching the exported tasks (paste it in the project)."""
    tag = "BrushLabels" if fmt == "rle" else "PolygonLabels"
    labels = "".join(f'    <Label value="{escape(c.name)}"/>\n' for c in cats)
    return (f'<View>\n  <Image name="{escape(to_name)}" value="$image"/>\n'
            f'  <{tag} name="{escape(from_name)}" toName="{escape(to_name)}">\n{labels}'
            f"  </{tag}>\n</View>\n")  # fmt: skip


def _results(row: dict[str, Any], name: str, fmt: str, names: tuple[str, str]) -> list[dict]:
    """The result item(s) of one detection: one brush, or one polygon per outer contour."""
    if row["mask_rle"] is None:  # the engine always writes masks; nothing to draw without one
        return []
    mask = decode_rle(row["mask_rle"], row["mask_size"])
    key = f"{row['image_id']}/{row['class_id']}/{row['score']}/{row['mask_rle'][:32]!r}"
    rid = hashlib.sha1(key.encode()).hexdigest()[:10]
    base = {"from_name": names[0], "to_name": names[1], "original_width": row["width"],
            "original_height": row["height"], "image_rotation": 0,
            "score": round(float(row["score"]), 6)}  # fmt: skip
    if fmt == "rle":
        value = {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [name]}
        return [{"id": rid, "type": "brushlabels", **base, "value": value}]
    return [
        {"id": f"{rid}-{k}", "type": "polygonlabels", **base,
         "value": {"points": points, "closed": True, "polygonlabels": [name]}}
        for k, points in enumerate(mask_to_percent_polygons(mask))
    ]  # fmt: skip


@dataclass(frozen=True)
class LabelStudioExport:
    """What was written: the file, its tasks and their result items."""

    path: str
    tasks: int
    results: int


def export_labelstudio(
    output: Location,
    out: Location,
    *,
    fmt: str = "rle",
    concepts: Sequence[str] | None = None,
    min_score: float | None = None,
    from_name: str = "label",
    to_name: str = "image",
) -> LabelStudioExport:
    """Write one task per ok still image (images without detections too, with no
    predictions) as a JSON list; ``fmt`` is ``rle`` (brush) or ``polygon``."""
    if fmt not in ("rle", "polygon"):
        raise ValueError(f"format {fmt!r}: expected 'rle' or 'polygon'")
    cats = select_categories(categories(output), concepts)
    names = {c.class_id: c.name for c in cats}
    floor = float(min_score) if min_score is not None else float("-inf")
    con = connect(output)
    n_tasks = n_results = 0
    try:
        (video,) = con.execute("SELECT count(*) FROM det WHERE frame_index IS NOT NULL").fetchall()
        if video[0]:
            logger.warning(
                "%d video detections left out (Label Studio video tasks differ)", video[0]
            )
        sql = _TASKS_SQL.format(classes=sql_list(sorted(names) or [""]))
        with open_output(out) as f:
            f.write("[")
            task: dict[str, Any] | None = None
            for row in stream(con, sql, [floor]):
                if task is None or task["data"]["sam3ray_image_id"] != row["image_id"]:
                    n_results += _flush(f, task, n_tasks)
                    n_tasks += task is not None
                    task = {"data": {"image": row["uri"], "sam3ray_image_id": row["image_id"]},
                            "predictions": [], "_model": None, "_results": []}  # fmt: skip
                if row["class_id"] is not None:
                    task["_model"] = task["_model"] or row["model"]
                    name = names[row["class_id"]]
                    task["_results"] += _results(row, name, fmt, (from_name, to_name))
            n_results += _flush(f, task, n_tasks)
            n_tasks += task is not None
            f.write("\n]\n")
    finally:
        con.close()
    logger.info("Label Studio: %d tasks, %d results -> %s", n_tasks, n_results, out.uri)
    return LabelStudioExport(out.uri, n_tasks, n_results)


def _flush(f: Any, task: dict[str, Any] | None, index: int) -> int:
    if task is None:
        return 0
    results = task.pop("_results")
    model = task.pop("_model")
    if results:
        score = float(np.mean([r["score"] for r in results]))
        task["predictions"] = [{"model_version": model or "sam3ray", "score": round(score, 6),
                                "result": results}]  # fmt: skip
    f.write(("\n" if index == 0 else ",\n") + json.dumps(task, separators=(",", ":")))
    return len(results)
