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

Polygons (``fmt="polygon"``): one labelled region per detection, its largest
part; further parts of a multi-part mask are regions of the same label and
score whose ``parentID`` is that region (Label Studio's region tree groups
them; the counts below count a detection once). Only outer contours are
simplified (Douglas-Peucker, ``tolerance`` 1 px, doubled per part until it has
at most ``max_points`` vertices); Label Studio polygons have no holes, so
holes are filled and, like parts under ``min_part_px`` or beyond ``max_parts``,
reported in pixels (:class:`PolygonLoss`), never silently. Everything runs in
C per mask (``core.masks.outline_mask``), so export time is linear in
detections and close to the brush export's. A detection with no mask pixel at
the image's size has nothing to draw in either format: it is counted
(``LabelStudioExport.empty``) instead of exported as an invisible region.

Image URLs as Label Studio can load them: object-store URIs stay ``s3://`` /
``gs://`` (a cloud storage connection of the project resolves them), or become
presigned HTTPS URLs (``presign`` seconds); local files become
``/data/local-files/?d=<path under the document root>`` (``local_files_root``:
Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT``, with ``LOCAL_FILES_SERVING_ENABLED``
and a Local Files storage of the project on ``storage_path`` or above). A bare
local path loads nowhere; the export says so. Video detections are left out:
Label Studio's video tasks are another format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import quote

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
from sam3ray.core.masks import decode_rle, mask_at, outline_mask
from sam3ray.core.uri import is_object_store, local_path
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


def labeling_config(
    cats: Sequence[Category], fmt: str = "rle", from_name: str = "label", to_name: str = "image"
) -> str:
    """A Label Studio labelling config matching the exported tasks (paste it in the project)."""
    tag = "BrushLabels" if fmt == "rle" else "PolygonLabels"
    labels = "".join(f'    <Label value="{escape(c.name)}"/>\n' for c in cats)
    return (f'<View>\n  <Image name="{escape(to_name)}" value="$image"/>\n'
            f'  <{tag} name="{escape(from_name)}" toName="{escape(to_name)}">\n{labels}'
            f"  </{tag}>\n</View>\n")  # fmt: skip


@dataclass(frozen=True)
class PolygonOptions:
    """How masks become polygons (``fmt="polygon"``); the defaults are documented in
    the README: 1 px tolerance, at most 256 vertices per region, parts of fewer
    than 16 pixels and beyond the 16 largest of a detection left out."""

    tolerance: float = 1.0
    max_points: int = 256
    min_part_px: int = 16
    max_parts: int = 16


@dataclass
class PolygonLoss:
    """What polygons could not carry, summed over an export (pixels of the masks)."""

    mask_px: int = 0
    holes: int = 0
    hole_px: int = 0  # pixels outside the masks that filled holes cover
    dropped_parts: int = 0
    dropped_px: int = 0  # mask pixels of parts left out
    max_tolerance: float = 0.0
    multi_part: int = 0  # detections drawn as more than one region

    def add(self, outline: Any) -> None:
        self.mask_px += outline.area
        self.holes += outline.holes
        self.hole_px += outline.hole_px
        self.dropped_parts += outline.dropped_parts
        self.dropped_px += outline.dropped_px
        self.max_tolerance = max(self.max_tolerance, outline.tolerance)
        self.multi_part += len(outline.parts) > 1

    def describe(self) -> str:
        """One line for people: the loss as shares of the masks' pixels."""
        share = 100 / max(1, self.mask_px)
        return (f"holes filled: {self.holes} (+{self.hole_px} px, {self.hole_px * share:.2f}% of "
                f"mask pixels); parts left out: {self.dropped_parts} ({self.dropped_px} px, "
                f"{self.dropped_px * share:.2f}%); multi-part detections: {self.multi_part}; "
                f"tolerance used <= {self.max_tolerance:g} px")  # fmt: skip


def _region_id(row: dict[str, Any]) -> str:
    key = f"{row['image_id']}/{row['class_id']}/{row['score']}/{row['mask_rle'][:32]!r}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _results(
    row: dict[str, Any],
    name: str,
    fmt: str,
    names: tuple[str, str],
    polygons: PolygonOptions,
    loss: PolygonLoss,
) -> list[dict] | None:
    """The result item(s) of one detection: one brush, or one polygon per kept part
    (the first the detection's region, the others its children via ``parentID``).
    None for a detection with nothing to draw (no mask, or no pixel at the image's
    size): an empty region would be an invisible item to delete by hand."""
    if row["mask_rle"] is None:  # the engine always writes masks
        return None
    # Label Studio ties a mask to the image's pixels: a capped mask grid is scaled up.
    mask = mask_at(decode_rle(row["mask_rle"], row["mask_size"]), (row["height"], row["width"]))
    if not mask.any():
        return None
    rid = _region_id(row)
    base = {"from_name": names[0], "to_name": names[1], "original_width": row["width"],
            "original_height": row["height"], "image_rotation": 0,
            "score": round(float(row["score"]), 6)}  # fmt: skip
    if fmt == "rle":
        value = {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [name]}
        return [{"id": rid, "type": "brushlabels", **base, "value": value}]
    outline = outline_mask(
        mask,
        tolerance=polygons.tolerance,
        max_points=polygons.max_points,
        min_part_px=polygons.min_part_px,
        max_parts=polygons.max_parts,
    )
    loss.add(outline)
    h, w = mask.shape
    scale = np.array([100 / w, 100 / h])
    out = []
    for k, part in enumerate(outline.parts):
        points = np.round(np.clip(part * scale, 0, 100), 4).tolist()
        item = {"id": rid if k == 0 else f"{rid}-{k}", "type": "polygonlabels", **base,
                "value": {"points": points, "closed": True, "polygonlabels": [name]}}  # fmt: skip
        if k:
            item["parentID"] = rid
        out.append(item)
    return out


def image_url(
    uri: str,
    source: Location,
    *,
    local_files_root: str | None = None,
    presign: int | None = None,
) -> str:
    """``uri`` as a URL Label Studio loads (module doc); ValueError for a local file
    outside ``local_files_root`` (Label Studio refuses to serve it)."""
    if is_object_store(uri):
        if not presign:
            return uri
        loc = source.with_uri(uri)
        return loc.fs.sign(loc.path, expiration=int(presign))
    if local_files_root is None:
        return uri
    root = os.path.abspath(local_path(local_files_root))
    path = os.path.abspath(local_path(uri))
    rel = os.path.relpath(path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise ValueError(f"{path} is not under the local files root {root}")
    return "/data/local-files/?d=" + quote(rel.replace(os.sep, "/"))


@dataclass(frozen=True)
class LabelStudioExport:
    """What was written: the file, its tasks, predictions, detections and result items.

    ``results`` counts result items (regions): one per detection for brushes, one per
    kept part for polygons; ``empty`` detections (no mask pixel at the image's size) are
    counted in ``detections`` but drawn as no region. ``storage_path`` is the folder a
    Local Files storage of the project must cover (local images with
    ``local_files_root``); ``bare_local`` counts local images exported as plain paths,
    which Label Studio cannot load.
    """

    path: str
    tasks: int
    results: int
    predictions: int = 0
    detections: int = 0
    loss: PolygonLoss | None = None
    storage_path: str | None = None
    bare_local: int = 0
    buckets: tuple[str, ...] = field(default_factory=tuple)
    empty: int = 0


def export_labelstudio(
    output: Location,
    out: Location,
    *,
    fmt: str = "rle",
    concepts: Sequence[str] | None = None,
    min_score: float | None = None,
    from_name: str = "label",
    to_name: str = "image",
    local_files_root: str | None = None,
    presign: int | None = None,
    polygons: PolygonOptions | None = None,
) -> LabelStudioExport:
    """Write one task per ok still image (images without detections too, with no
    predictions) as a JSON list; ``fmt`` is ``rle`` (brush) or ``polygon``. Image URLs
    follow ``local_files_root`` / ``presign`` (module doc). Reads the output only."""
    if fmt not in ("rle", "polygon"):
        raise ValueError(f"format {fmt!r}: expected 'rle' or 'polygon'")
    if presign is not None and presign <= 0:
        raise ValueError(f"presign must be a positive number of seconds, got {presign}")
    polygons = polygons or PolygonOptions()
    loss = PolygonLoss()
    cats = select_categories(categories(output), concepts)
    names = {c.class_id: c.name for c in cats}
    floor = float(min_score) if min_score is not None else float("-inf")
    urls = {"local_files_root": local_files_root, "presign": presign}
    con = connect(output)
    n = {"tasks": 0, "results": 0, "predictions": 0, "detections": 0, "bare": 0, "empty": 0}
    local_dirs: set[str] = set()
    buckets: set[str] = set()
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
                    _flush(f, task, n)
                    uri = row["uri"]
                    if is_object_store(uri):
                        buckets.add(uri.split("/", 3)[2])
                    elif local_files_root is None:
                        n["bare"] += 1
                    else:
                        local_dirs.add(os.path.dirname(os.path.abspath(local_path(uri))))
                    task = {"data": {"image": image_url(uri, output, **urls),
                                     "sam3ray_image_id": row["image_id"], "sam3ray_uri": uri},
                            "predictions": [], "_model": None, "_results": []}  # fmt: skip
                if row["class_id"] is not None:
                    task["_model"] = task["_model"] or row["model"]
                    name = names[row["class_id"]]
                    drawn = _results(row, name, fmt, (from_name, to_name), polygons, loss)
                    n["detections"] += 1
                    if drawn is None:
                        n["empty"] += 1
                    else:
                        task["_results"] += drawn
            _flush(f, task, n)
            f.write("\n]\n")
    finally:
        con.close()
    storage = os.path.commonpath(sorted(local_dirs)) if local_dirs else None
    if n["bare"]:  # the one warning, for API and CLI users alike (the CLI does not repeat it)
        logger.warning("%d images are local paths Label Studio cannot load: export with a "
                       "local files root (local_files_root, CLI --local-files-root: Label "
                       "Studio's LOCAL_FILES_DOCUMENT_ROOT)", n["bare"])  # fmt: skip
    logger.info("Label Studio: %d tasks, %d predictions, %d detections (%d empty, not drawn), "
                "%d results -> %s", n["tasks"], n["predictions"], n["detections"], n["empty"],
                n["results"], out.uri)  # fmt: skip
    return LabelStudioExport(out.uri, n["tasks"], n["results"], n["predictions"],
                             n["detections"], loss if fmt == "polygon" else None, storage,
                             n["bare"], tuple(sorted(buckets)), n["empty"])  # fmt: skip


def _flush(f: Any, task: dict[str, Any] | None, n: dict[str, int]) -> None:
    if task is None:
        return
    results = task.pop("_results")
    model = task.pop("_model")
    if results:
        score = float(np.mean([r["score"] for r in results if "parentID" not in r]))
        task["predictions"] = [{"model_version": model or "sam3ray", "score": round(score, 6),
                                "result": results}]  # fmt: skip
        n["predictions"] += 1
    f.write(("\n" if n["tasks"] == 0 else ",\n") + json.dumps(task, separators=(",", ":")))
    n["tasks"] += 1
    n["results"] += len(results)
