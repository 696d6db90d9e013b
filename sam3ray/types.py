"""Plain value types shared by the prompt tables, the engine and the writer.

They live apart from every heavy module so that the driver, the stages and the
tests can pass them around without importing torch, sam3 or Ray.
"""

from __future__ import annotations

import hashlib
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


#: Per image: class_id -> that image's exemplars for the class.
ImageExemplars = dict[str, list[Exemplar]]


def stable_id(text: str, n: int = 16) -> str:
    """A short, stable hex id (sha1 prefix) of a string such as a URI."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]
