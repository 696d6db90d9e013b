"""Turn (images, concept set, exemplars) into the flat query list the engine packs.

Rule (from the prompt-table design): all prompts of one class on one image
form one combined query — a text plus that image's exemplars for the class.
A class with several texts (synonyms) gives one query per text, merged later
by that class's NMS. A class with exemplars but no text uses SAM 3's "visual"
text, as ``Sam3Processor.add_geometric_prompt`` does. A class with neither on
an image asks nothing of that image.

Validation happens here, before the model runs, so a bad item fails the whole
call with a message naming it and no partial output exists.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sam3ray.core.types import VISUAL_TEXT, ConceptSet, Exemplar, ImageExemplars, query_label


@dataclass(frozen=True)
class Query:
    image: int
    class_id: str
    text: str
    #: ((cx, cy, w, h) normalised, positive)
    boxes: tuple[tuple[tuple[float, float, float, float], bool], ...] = ()
    #: ((x, y) normalised, positive)
    points: tuple[tuple[tuple[float, float], bool], ...] = ()

    @property
    def label(self) -> str:
        """The ``query`` column (``core.types.query_label``), e.g. 'text:"car" +1 box -1 box'."""
        kinds = [("box", p) for _, p in self.boxes] + [("point", p) for _, p in self.points]
        return query_label(self.text, kinds)


def validate_images(images: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """(height, width) per image; ValueError naming a bad item."""
    if len(images) == 0:
        raise ValueError("empty batch: give at least one image")
    sizes = []
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray):
            raise ValueError(f"image {i}: expected a numpy array, got {type(img).__name__}")
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image {i}: expected an H×W×3 RGB array, got shape {img.shape}")
        if img.dtype != np.uint8:
            raise ValueError(f"image {i}: expected dtype uint8, got {img.dtype}")
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"image {i}: empty image of shape {img.shape}")
        sizes.append((int(img.shape[0]), int(img.shape[1])))
    return sizes


def _check_exemplar(ex: Exemplar, image: int, class_id: str, h: int, w: int) -> None:
    where = f"image {image}, class {class_id}: {ex.kind} {list(ex.coords)}"
    want = 4 if ex.kind == "box" else 2
    if ex.kind not in ("box", "point") or len(ex.coords) != want:
        raise ValueError(f"{where}: expected a box (x0,y0,x1,y1) or a point (x,y)")
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in ex.coords):
        raise ValueError(f"{where}: coordinates must be finite numbers")
    xs, ys = [float(v) for v in ex.coords[0::2]], [float(v) for v in ex.coords[1::2]]
    if ex.kind == "box" and (xs[1] <= xs[0] or ys[1] <= ys[0]):
        raise ValueError(f"{where}: needs x1 > x0 and y1 > y0")
    if min(xs) < 0 or min(ys) < 0 or max(xs) > w or max(ys) > h:
        raise ValueError(f"{where}: outside the {w}x{h} image")


def build_queries(
    concepts: ConceptSet,
    exemplars: Sequence[ImageExemplars | None] | None,
    sizes: Sequence[tuple[int, int]],
    n_images: int,
) -> list[Query]:
    if exemplars is not None and len(exemplars) != n_images:
        raise ValueError(f"exemplars has {len(exemplars)} entries for {n_images} images")
    queries: list[Query] = []
    for i in range(n_images):
        per_class = (exemplars[i] if exemplars is not None else None) or {}
        unknown = sorted(set(per_class) - set(concepts.by_id))
        if unknown:
            raise ValueError(f"image {i}: exemplars for unknown class_id {unknown[0]}")
        h, w = sizes[i]
        for concept in concepts:
            exs = per_class.get(concept.class_id, [])
            boxes, points = [], []
            for ex in exs:
                _check_exemplar(ex, i, concept.class_id, h, w)
                if ex.kind == "box":
                    x0, y0, x1, y1 = (float(v) for v in ex.coords)
                    box = ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h)
                    boxes.append((box, bool(ex.positive)))
                else:
                    x, y = float(ex.coords[0]), float(ex.coords[1])
                    points.append(((x / w, y / h), bool(ex.positive)))
            texts = concept.texts or ((VISUAL_TEXT,) if exs else ())
            for text in texts:
                queries.append(Query(i, concept.class_id, text, tuple(boxes), tuple(points)))
    return queries
