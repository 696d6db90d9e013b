"""Load and validate the concept table and the geometric (exemplar) table.

These tables decide what a job labels, so a mistake in them must stop the job
before any GPU time is spent, with a message naming file, row and field. No row
is ever dropped silently. Rows are numbered as a user finds them in the file:
CSV rows by their line (header = line 1), Parquet and YAML rows from 1.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import uuid
from collections.abc import Mapping
from typing import Any

import yaml

from sam3ray.core.errors import PromptTableError
from sam3ray.core.ids import input_id
from sam3ray.core.types import Concept, ConceptSet, Exemplar, ImageExemplars
from sam3ray.core.uri import canonical_input
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

CONCEPT_COLUMNS = ("class_id", "name", "text", "min_score")
GEOMETRIC_COLUMNS = ("image_uri", "image_id", "class_id", "kind", "x0", "y0", "x1", "y1", "x",
                     "y", "positive", "frame_index")  # fmt: skip
_BOX, _POINT = ("x0", "y0", "x1", "y1"), ("x", "y")
_TRUE, _FALSE = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f"}

Row = tuple[int, dict[str, Any]]


def _blank(v: Any) -> bool:
    return (
        v is None
        or (isinstance(v, float) and math.isnan(v))
        or (isinstance(v, str) and not v.strip())
    )


def _parse(uri: str, suffix: str, raw: bytes) -> tuple[list[str], list[Row]]:
    """Columns (stripped, lower-case) and numbered rows of one table file."""
    rows: list[Row] = []
    if suffix == ".csv":
        reader = csv.reader(io.StringIO(raw.decode("utf-8-sig")))
        columns = [c.strip().lower() for c in next(reader, None) or []]
        last = reader.line_num
        for cells in reader:
            line, last = last + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(columns):
                raise PromptTableError(
                    f"{uri} row {line}: {len(cells)} cells but {len(columns)} columns"
                )
            rows.append((line, dict(zip(columns, cells, strict=False))))
        return columns, rows
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(raw))
        columns = [c.strip().lower() for c in table.column_names]
        if len(set(columns)) == len(columns):
            table = table.rename_columns(columns)
            rows = [(i + 1, r) for i, r in enumerate(table.to_pylist())]
        return columns, rows
    if suffix in (".yaml", ".yml", ".json"):
        data = yaml.safe_load(raw.decode("utf-8-sig"))
        if not isinstance(data, list):
            raise PromptTableError(f"{uri}: expected a list of rows (mappings)")
        seen: dict[str, None] = {}
        for i, item in enumerate(data, 1):
            if not isinstance(item, Mapping):
                raise PromptTableError(f"{uri} row {i}: expected a mapping, got {item!r}")
            row = {str(k).strip().lower(): v for k, v in item.items()}
            seen.update(dict.fromkeys(row))
            rows.append((i, row))
        return list(seen), rows
    raise PromptTableError(f"{uri}: unsupported table type {suffix!r} (csv, parquet, yaml)")


def _read_rows(
    loc: Location, allowed: tuple[str, ...], required: tuple[str, ...] = ()
) -> list[Row]:
    """Rows of a CSV/Parquet/YAML/JSON table as (row number, {column: value or None})."""
    uri, path = loc.uri, loc.path
    try:
        raw = loc.read_bytes()
    except OSError as exc:
        raise PromptTableError(f"{uri}: cannot read: {exc}") from None
    try:
        columns, rows = _parse(uri, os.path.splitext(path)[1].lower(), raw)
    except PromptTableError:
        raise
    except (ValueError, csv.Error, yaml.YAMLError) as exc:  # bad encoding, not Parquet, …
        raise PromptTableError(f"{uri}: cannot parse: {exc}") from None
    if len(set(columns)) != len(columns):
        raise PromptTableError(f"{uri}: duplicate column names {columns}")
    for col in columns:
        if col not in allowed:
            raise PromptTableError(f"{uri}: unknown column {col!r} (allowed: {', '.join(allowed)})")
    for col in required:
        if rows and col not in columns:
            raise PromptTableError(f"{uri}: missing column {col!r}")
    return [(n, {c: (None if _blank(v) else v) for c, v in r.items()}) for n, r in rows]


def _text(v: Any) -> str | None:
    return None if v is None else str(v).strip()


def _uuid(uri: str, n: int, v: Any) -> str:
    if v is None:
        raise PromptTableError(f"{uri} row {n}: class_id is missing")
    try:
        return str(uuid.UUID(str(v).strip()))
    except ValueError:
        raise PromptTableError(f"{uri} row {n}: class_id {v!r} is not a UUID") from None


def _float(uri: str, n: int, field: str, v: Any) -> float:
    try:
        if isinstance(v, bool):
            raise ValueError
        out = float(v)
    except (TypeError, ValueError):
        raise PromptTableError(f"{uri} row {n}: {field} {v!r} is not a number") from None
    if not math.isfinite(out):
        raise PromptTableError(f"{uri} row {n}: {field} {v!r} is not a finite number")
    return out


def load_concepts(loc: Location) -> ConceptSet:
    """Read the concept table: rows grouped by class_id (synonym texts), in first-seen order."""
    uri = loc.uri
    rows = _read_rows(loc, CONCEPT_COLUMNS, ("class_id",))
    if not rows:
        raise PromptTableError(f"{uri}: the concept table has no rows")
    order: list[str] = []
    names: dict[str, tuple[str, int]] = {}
    texts: dict[str, list[str]] = {}
    first_row: dict[str, int] = {}
    text_owner: dict[str, str] = {}
    scores: dict[str, tuple[float, int]] = {}
    for n, row in rows:
        cid = _uuid(uri, n, row.get("class_id"))
        name, text, score = _text(row.get("name")), _text(row.get("text")), row.get("min_score")
        if not name and not text:
            raise PromptTableError(f"{uri} row {n}: text: empty prompt (neither text nor name)")
        if cid not in texts:
            order.append(cid)
            texts[cid], first_row[cid] = [], n
        if text and text not in texts[cid]:
            texts[cid].append(text)
            if text_owner.setdefault(text, cid) != cid:
                logger.warning(
                    "%s row %d: text %r is also a prompt of class_id %s",
                    uri,
                    n,
                    text,
                    text_owner[text],
                )
        if name:
            if cid in names and names[cid][0] != name:
                old, at = names[cid]
                raise PromptTableError(
                    f"{uri} row {n}: name {name!r} contradicts name {old!r} of class_id {cid} "
                    f"(row {at})"
                )
            names.setdefault(cid, (name, n))
        if score is not None:
            s = _float(uri, n, "min_score", score)
            if not 0 <= s <= 1:
                raise PromptTableError(f"{uri} row {n}: min_score {s} is not within 0..1")
            if cid in scores and scores[cid][0] != s:
                raise PromptTableError(
                    f"{uri} row {n}: min_score {s} contradicts {scores[cid][0]} of class_id "
                    f"{cid} (row {scores[cid][1]})"
                )
            scores.setdefault(cid, (s, n))
    concepts, by_name = [], {}
    for cid in order:
        name = names[cid][0] if cid in names else texts[cid][0]
        key = name.casefold()
        if key in by_name:
            at = names[cid][1] if cid in names else first_row[cid]
            raise PromptTableError(
                f"{uri} row {at}: name {name!r} of class_id {cid} is already used by class_id "
                f"{by_name[key]}"
            )
        by_name[key] = cid
        score = scores[cid][0] if cid in scores else None
        concepts.append(Concept(class_id=cid, name=name, texts=tuple(texts[cid]), min_score=score))
    logger.info("%s: %d concepts from %d rows", uri, len(concepts), len(rows))
    return ConceptSet(tuple(concepts))


def _bool(uri: str, n: int, v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, bool):
        return v
    key = (
        str(int(v) if isinstance(v, (int, float)) and float(v).is_integer() else v).strip().lower()
    )
    if key in _TRUE or key in _FALSE:
        return key in _TRUE
    raise PromptTableError(
        f"{uri} row {n}: positive {v!r} is not a boolean (true/false/1/0/yes/no)"
    )


def _frame(uri: str, n: int, v: Any) -> int | None:
    if v is None:
        return None
    f = _float(uri, n, "frame_index", v)
    if not f.is_integer() or f < 0:
        raise PromptTableError(f"{uri} row {n}: frame_index {v!r} is not an integer >= 0")
    return int(f)


def _exemplar(uri: str, n: int, row: dict[str, Any]) -> Exemplar:
    kind = _text(row.get("kind"))
    if kind is None:  # infer only when the coordinates leave no doubt
        has_box, has_point = (any(row.get(c) is not None for c in cs) for cs in (_BOX, _POINT))
        if has_box == has_point:
            raise PromptTableError(f"{uri} row {n}: kind is missing (box or point)")
        kind = "box" if has_box else "point"
    kind = kind.lower()
    if kind not in ("box", "point"):
        raise PromptTableError(f"{uri} row {n}: kind {row.get('kind')!r} is not box or point")
    need, other = (_BOX, _POINT) if kind == "box" else (_POINT, _BOX)
    for c in other:
        if row.get(c) is not None:
            raise PromptTableError(f"{uri} row {n}: {c} is given for a {kind}")
    coords = []
    for c in need:
        if row.get(c) is None:
            raise PromptTableError(f"{uri} row {n}: {c} is missing for a {kind}")
        v = _float(uri, n, c, row[c])
        if v < 0:
            raise PromptTableError(f"{uri} row {n}: {c} {v} is negative")
        coords.append(v)
    if kind == "box" and (coords[2] <= coords[0] or coords[3] <= coords[1]):
        # an empty box (x1 == x0) has no pixels to exemplify: refuse it here, not mid-job
        bad = "x1" if coords[2] <= coords[0] else "y1"
        what = "equal to" if coords[2] == coords[0] or coords[3] == coords[1] else "smaller than"
        raise PromptTableError(f"{uri} row {n}: {bad} is {what} {bad[0]}0 in box {coords}")
    return Exemplar(kind, tuple(coords), _bool(uri, n, row.get("positive")),
                    _frame(uri, n, row.get("frame_index")))  # fmt: skip


class GeometricPrompts:
    """Exemplars of a job, looked up per image by URI or image id, in table order.

    Entries are ``(image_uri, image_id, class_id, exemplar)``, optionally with the
    table row as a fifth item (so a later check can name it); ``source`` is the table.
    """

    def __init__(
        self,
        entries: list[tuple[Any, ...]] = (),
        source: str = "prompts.geometric",
    ) -> None:
        self._entries = [(*e[:4], e[4] if len(e) > 4 else None) for e in entries]
        self.source = source
        self._by_uri: dict[str, list[int]] = {}
        self._by_id: dict[str, list[int]] = {}
        for i, (uri, image_id, *_) in enumerate(self._entries):
            if uri is not None:
                self._by_uri.setdefault(uri, []).append(i)
            if image_id is not None:
                self._by_id.setdefault(image_id, []).append(i)

    def __len__(self) -> int:
        return len(self._entries)

    def image_keys(self) -> list[str]:
        """Every image URI and image id the table names (to report unmatched ones)."""
        return sorted(set(self._by_uri) | set(self._by_id))

    def rows_for(self, uri: str, image_id: str) -> list[tuple[int | None, str, Exemplar]]:
        """``(table row, class_id, exemplar)`` of one image or video, in table order."""
        idx = sorted(
            set(self._by_uri.get(canonical_input(uri), ())) | set(self._by_id.get(image_id, ()))
        )
        return [(self._entries[i][4], self._entries[i][2], self._entries[i][3]) for i in idx]

    def for_image(self, uri: str, image_id: str) -> ImageExemplars:
        out: ImageExemplars = {}
        for _, class_id, ex in self.rows_for(uri, image_id):
            out.setdefault(class_id, []).append(ex)
        return out


def load_geometric(loc: Location, concepts: ConceptSet) -> GeometricPrompts:
    """Read the exemplar table; every row must name an image and a known class."""
    uri = loc.uri
    entries = []
    for n, row in _read_rows(loc, GEOMETRIC_COLUMNS, ("class_id",)):
        image_uri, image_id = _text(row.get("image_uri")), _text(row.get("image_id"))
        if image_uri is None and image_id is None:
            raise PromptTableError(
                f"{uri} row {n}: image_uri: neither image_uri nor image_id given"
            )
        if image_uri is not None:
            image_uri = canonical_input(image_uri)
            if image_id is not None and image_id != input_id(image_uri):
                raise PromptTableError(
                    f"{uri} row {n}: image_id {image_id!r} is not the id of {image_uri} "
                    f"({input_id(image_uri)})"
                )
        class_id = _uuid(uri, n, row.get("class_id"))
        if class_id not in concepts.by_id:
            raise PromptTableError(
                f"{uri} row {n}: class_id {class_id} is not in the concept table"
            )
        entries.append((image_uri, image_id, class_id, _exemplar(uri, n, row), n))
    if not entries:
        logger.warning("%s: the geometric prompt table has no rows", uri)
    return GeometricPrompts(entries, source=uri)


def check_video_exemplars(
    geometric: GeometricPrompts, uri: str, video_id: str, frame_stride: int = 1
) -> None:
    """Refuse what the SAM 3 video API cannot express, naming the rows.

    ``add_prompt`` takes one box per prompted frame (its visual prompt; sam3 0.1.4
    drops any further box of that call), so a class may carry at most one box per
    sampled frame of a video: two boxes there would silently lose one.
    """
    seen: dict[tuple[str, int], int | None] = {}
    for row, class_id, ex in geometric.rows_for(uri, video_id):
        if ex.kind != "box":
            continue
        key = (class_id, round((ex.frame_index or 0) / frame_stride))
        if key in seen:
            first = seen[key]
            raise PromptTableError(
                f"{geometric.source} row {row}: a second box of class_id {class_id} on frame "
                f"{ex.frame_index or 0} of video {uri} (row {first} has the first; with "
                f"video.frame_stride {frame_stride} they prompt the same sampled frame): the "
                "SAM 3 video model takes one box per prompted frame; give the others "
                "another frame_index, or points"
            )
        seen[key] = row


def check_exemplars_in_image(ex: ImageExemplars, width: int, height: int) -> str | None:
    """Why the exemplars do not fit a ``width`` x ``height`` image, or None if they do.

    Known only after decoding, so it becomes an error row for that image rather than
    a refusal of the whole job.
    """
    for class_id, items in ex.items():
        for e in items:
            xs, ys = e.coords[0::2], e.coords[1::2]
            if min(e.coords) < 0 or max(xs) > width or max(ys) > height:
                return (
                    f"{e.kind} {tuple(e.coords)} of class_id {class_id} lies outside the "
                    f"{width}x{height} image"
                )
    return None
