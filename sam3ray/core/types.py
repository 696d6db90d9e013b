"""Plain value types shared by the prompt tables, the engine and the writer.

They live apart from every heavy module so that the driver, the stages and the
tests can pass them around without importing torch, sam3 or Ray.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

#: The text SAM 3 uses for a query that has exemplars but no words
#: (``Sam3Processor.add_geometric_prompt`` does the same).
VISUAL_TEXT = "visual"


@dataclass(frozen=True)
class Exemplar:
    """One geometric prompt in original-image pixels.

    ``coords`` is ``(x0, y0, x1, y1)`` for a box and ``(x, y)`` for a point.
    ``positive=False`` marks a negative exemplar ("not this").
    """

    kind: Literal["box", "point"]
    coords: tuple[float, ...]
    positive: bool = True
    frame_index: int | None = None


@dataclass(frozen=True)
class Concept:
    """Everything the prompt table says about one class UUID."""

    class_id: str
    name: str
    texts: tuple[str, ...] = ()
    min_score: float | None = None


@dataclass(frozen=True)
class ConceptSet:
    """The concepts of a job, in a stable order (the order of first appearance)."""

    concepts: tuple[Concept, ...]
    by_id: dict[str, Concept] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", {c.class_id: c for c in self.concepts})

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self):
        return iter(self.concepts)


@dataclass(frozen=True)
class Detection:
    """One instance found by a model, in original-image pixels.

    Images leave ``frame`` and ``track`` empty; a video tracker sets them to the
    shard-local frame and track (the stages turn them into source frame numbers
    and global track ids).
    """

    class_id: str
    concept: str
    query: str  # see query_label
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    mask_rle: bytes  # COCO compressed counts
    mask_size: tuple[int, int]  # h, w
    area: int
    frame: int | None = None
    track: int | None = None


#: Per image: class_id -> that image's exemplars for the class.
ImageExemplars = dict[str, list[Exemplar]]


def query_label(
    text: str | None, exemplars: Iterable[tuple[str, bool]] = (), frame: int | None = None
) -> str:
    """The ``query`` column: which prompt produced a detection, one grammar for all paths.

    ``query := base (" " count)* [" @" frame]`` with ``base := 'text:"<text>"' | "visual"``
    and ``count := ("+" | "-") N " " ("box" | "point")``, positives before negatives,
    boxes before points; ``exemplars`` are ``(kind, positive)`` pairs. ``@frame``
    (videos) is the source frame the exemplars are on. Examples: ``text:"red car"``,
    ``text:"cat" +1 box -1 box``, ``visual +2 point -1 point @30``.
    """
    parts = ["visual" if text in (None, VISUAL_TEXT) else f'text:"{text}"']
    items = list(exemplars)
    for kind in ("box", "point"):
        pos = sum(1 for k, positive in items if k == kind and positive)
        neg = sum(1 for k, positive in items if k == kind and not positive)
        if pos:
            parts.append(f"+{pos} {kind}")
        if neg:
            parts.append(f"-{neg} {kind}")
    if frame is not None and items:
        parts.append(f"@{frame}")
    return " ".join(parts)
