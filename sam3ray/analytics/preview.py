"""A static HTML gallery of the labels: per concept, sample images with their masks.

Why static files: a reviewer (or a scheduled job) must be able to look at
labels without a server, a notebook or matplotlib; one ``index.html`` with
relative links to JPEG thumbnails and PNG histograms can be opened from a
disk, attached to a ticket or copied to a bucket next to the output.

Samples are chosen per concept by a hash of (image, concept), so reruns show
the same images and the choice is not biased to high scores. Images are read
through ``Location.read_bytes`` (retries, object stores) and decoded by
``sam3ray.sources.images.decode_image`` (EXIF orientation, as the masks were made).
Video detections are not rendered (frames need a video decoder).
An inline script marks ``<body data-images-loaded="ok/total">`` once every
image has loaded, which is what the browser test reads.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sam3ray.analytics import categories, connect, select_categories, sql_list, stream, write_file
from sam3ray.analytics.stats import concept_stats
from sam3ray.core.masks import decode_rle
from sam3ray.sources.images import decode_image
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128),
           (170, 110, 40), (128, 0, 0)]  # fmt: skip
_BINS = 20
_SAMPLES_SQL = """
CREATE TEMP TABLE samples AS
WITH per_image AS (
    SELECT class_id, image_id, any_value(uri) AS uri, count(*) AS n, max(score) AS best
    FROM det WHERE frame_index IS NULL AND class_id IN {classes} GROUP BY class_id, image_id),
ranked AS (SELECT *, row_number() OVER (PARTITION BY class_id
                                        ORDER BY md5(image_id || class_id)) AS r FROM per_image)
SELECT * FROM ranked WHERE r <= ?
"""
_DETECTIONS_SQL = """
SELECT s.class_id, s.image_id, s.uri, s.n, s.best, s.r, d.score, d.box, d.mask_rle, d.mask_size
FROM det AS d JOIN samples AS s ON d.class_id = s.class_id AND d.image_id = s.image_id
WHERE d.frame_index IS NULL AND d.class_id IN {classes} AND d.image_id IN {images}
QUALIFY row_number() OVER (PARTITION BY s.class_id, s.image_id ORDER BY d.score DESC) <= ?
ORDER BY s.class_id, s.r, d.score DESC
"""


@dataclass(frozen=True)
class Preview:
    """Where the gallery is and what it holds."""

    index: str
    thumbnails: int
    failed: int


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def histogram_png(counts: Sequence[int], color: tuple[int, int, int]) -> bytes:
    """A score histogram (bins over 0..1) as PNG bytes, drawn with PIL only."""
    w, h, left, bottom = 360, 150, 44, 22
    im = Image.new("RGB", (w, h), "white")
    draw, font = ImageDraw.Draw(im), _font(11)
    top = max(max(counts, default=0), 1)
    bar = (w - left - 8) / len(counts)
    for i, n in enumerate(counts):
        y = (h - bottom) - (h - bottom - 10) * n / top
        draw.rectangle([left + i * bar + 1, y, left + (i + 1) * bar - 1, h - bottom], fill=color)
    draw.line([left, 8, left, h - bottom, w - 8, h - bottom], fill="black")
    for x, text in ((0, "0"), (0.5, "0.5"), (1, "1")):
        px = left + x * (w - left - 8)
        draw.text((px, h - bottom + 4), text, fill="black", font=font, anchor="ma")
    draw.text((left - 4, 8), f"{top:,}", fill="black", font=font, anchor="ra")
    draw.text((left - 4, h - bottom), "0", fill="black", font=font, anchor="rd")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def render_thumbnail(
    image: np.ndarray, detections: Sequence[Mapping[str, Any]], name: str, max_side: int = 512
) -> Image.Image:
    """The image scaled to ``max_side`` with each mask tinted, its box and a label."""
    base = Image.fromarray(image)
    full_w, full_h = base.size
    base.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    tw, th = base.size
    draw, font = ImageDraw.Draw(base), _font(12)
    for k, det in enumerate(detections):
        color = PALETTE[k % len(PALETTE)]
        mask = decode_rle(det["mask_rle"], det["mask_size"]).astype(np.uint8) * 255
        alpha = Image.fromarray(mask).resize((tw, th), Image.Resampling.BOX)
        alpha = alpha.point(lambda v: v * 45 // 100)
        base.paste(Image.new("RGB", (tw, th), color), (0, 0), alpha)
    for k, det in enumerate(detections):  # boxes and labels above every mask
        color = PALETTE[k % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in det["box"])  # in the image's pixels
        box = [x0 * tw / full_w, y0 * th / full_h, x1 * tw / full_w, y1 * th / full_h]
        draw.rectangle(box, outline=color, width=2)
        label = f"{name} {det['score']:.2f}"
        tx, ty = box[0], max(0.0, box[1] - 15)
        bbox = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle([bbox[0] - 2, bbox[1] - 1, bbox[2] + 2, bbox[3] + 1], fill=color)
        draw.text((tx, ty), label, fill="black" if sum(color) > 380 else "white", font=font)
    return base


def render_preview(
    output: Location,
    out_dir: Location,
    *,
    per_concept: int = 6,
    max_side: int = 512,
    max_masks: int = 20,
    concepts: Sequence[str] | None = None,
    max_pixels: int = 178_956_970,
) -> Preview:
    """Write ``out_dir/index.html`` with ``thumbs/`` and ``hist/`` next to it.

    ``per_concept`` images per concept, each with at most ``max_masks`` masks
    (highest scores). An image that cannot be read or decoded is logged and left
    out (the page says how many), so one missing object never costs the gallery.
    """
    cats = select_categories(categories(output), concepts)
    con = connect(output)
    try:
        table = concept_stats(output, con=con)
        numbers = {r["class_id"]: r for r in table.to_pylist()}
        hist: dict[str, list[int]] = {c.class_id: [0] * _BINS for c in cats}
        for cid, b, n in con.execute(
            f"SELECT class_id, least(greatest(floor(score * {_BINS}), 0), {_BINS - 1})::INT, "
            "count(*) FROM det GROUP BY ALL"
        ).fetchall():
            if cid in hist:
                hist[cid][b] = n
        classes = sql_list([c.class_id for c in cats] or [""])
        con.execute(_SAMPLES_SQL.format(classes=classes), [per_concept])
        images = [r[0] for r in con.execute("SELECT DISTINCT image_id FROM samples").fetchall()]
        sql = _DETECTIONS_SQL.format(classes=classes, images=sql_list(images or [""]))
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in stream(con, sql, [max_masks]):
            groups.setdefault((row["class_id"], row["image_id"]), []).append(row)
    finally:
        con.close()

    names = {c.class_id: c.name for c in cats}
    by_image: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    for (cid, image_id), dets in groups.items():
        by_image.setdefault(image_id, []).append((cid, dets))
    figures: dict[str, list[str]] = {c.class_id: [] for c in cats}
    failed = 0
    for image_id, per_class in by_image.items():  # decode each image once, keep one at a time
        uri = per_class[0][1][0]["uri"]
        try:
            image = decode_image(output.with_uri(uri).read_bytes(), max_pixels=max_pixels)
        except Exception as exc:  # one unreadable image must not cost the gallery
            logger.warning("preview: cannot read %s: %s", uri, exc)
            failed += 1
            continue
        for cid, dets in per_class:
            rel = f"thumbs/{cid}/{image_id}.jpg"
            figures[cid].append(_thumbnail(image, dets, names[cid], max_side, out_dir, rel))
    for k, cat in enumerate(cats):
        png = histogram_png(hist[cat.class_id], PALETTE[k % len(PALETTE)])
        write_file(out_dir.child(f"hist/{cat.class_id}.png"), png)
    html = _page(output.uri, cats, numbers, figures, failed)
    index = out_dir.child("index.html")
    write_file(index, html.encode("utf-8"))
    n_thumbs = sum(len(v) for v in figures.values())
    logger.info("preview: %d thumbnails (%d unreadable) -> %s", n_thumbs, failed, index.uri)
    return Preview(index.uri, n_thumbs, failed)


def _thumbnail(
    image: np.ndarray,
    dets: Sequence[Mapping[str, Any]],
    name: str,
    max_side: int,
    out_dir: Location,
    rel: str,
) -> str:
    """Render and write one thumbnail; return its <figure>."""
    thumb = render_thumbnail(image, dets, name, max_side)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    write_file(out_dir.child(rel), buf.getvalue())
    first = dets[0]
    caption = (
        f"{escape(first['uri'].rsplit('/', 1)[-1])} · {first['n']} det · best {first['best']:.2f}"
    )
    return (
        f'<figure><img src="{rel}" width="{thumb.width}" height="{thumb.height}" '
        f'alt="{escape(name)}" title="{escape(first["uri"])}"><figcaption>{caption}</figcaption>'
        "</figure>"
    )


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}h2 small{color:#888;font-size:60%}
.grid{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;max-width:512px}
figure img{display:block;max-width:100%;height:auto}figcaption{font-size:12px;color:#555}
.stats{color:#444}nav a{margin-right:1em}"""
_SCRIPT = """(function(){function check(){var a=Array.prototype.slice.call(document.images);
var ok=a.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
document.body.setAttribute('data-images-loaded',ok+'/'+a.length);}
window.addEventListener('load',check);check();})();"""


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _page(
    output_uri: str,
    cats: Sequence[Any],
    numbers: Mapping[str, Mapping[str, Any]],
    figures: Mapping[str, list[str]],
    failed: int,
) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note = f" · {failed} sample image(s) could not be read" if failed else ""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>sam3ray labels: "
        f"{escape(output_uri)}</title><style>{_STYLE}</style></head>"
        f"<body data-images-loaded='pending'><h1>Labels of {escape(output_uri)}</h1>"
        f"<p class='stats'>{len(cats)} concepts · generated {when}{note}</p><nav>"
    ]
    found = sorted(cats, key=lambda c: (not numbers.get(c.class_id, {}).get("detections"), c.id))
    parts += [f"<a href='#c-{c.class_id}'>{escape(c.name)}</a>" for c in found]
    parts.append("</nav>")
    for cat in found:  # concepts that found something first, then the empty ones
        n = numbers.get(cat.class_id, {})
        parts.append(
            f"<section id='c-{cat.class_id}'><h2>{escape(cat.name)} <small>{cat.class_id}"
            f"</small></h2><p class='stats'>{n.get('detections', 0):,} detections in "
            f"{n.get('images', 0):,} images · score mean {_fmt(n.get('score_mean'))}, p10/p50/p90 "
            f"{_fmt(n.get('score_p10'))} / {_fmt(n.get('score_p50'))} / "
            f"{_fmt(n.get('score_p90'))} · mean mask area {_fmt(n.get('mask_area_mean'), ',.0f')}"
            f" px</p><img class='hist' src='hist/{cat.class_id}.png' width='360' height='150' "
            f"alt='score histogram of {escape(cat.name)}'><div class='grid'>"
            + ("".join(figures.get(cat.class_id, [])) or "<p>no sample images</p>")
            + "</div></section>"
        )
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)
