"""The ``query`` column's one grammar (core.types.query_label), for images and videos.

query := base (" " count)* [" @" frame]
base  := 'text:"<text>"' | "visual"
count := ("+" | "-") N " " ("box" | "point"), positives before negatives, boxes before points
"""

from __future__ import annotations

import re

import pytest

from sam3ray.core.types import VISUAL_TEXT, query_label

GRAMMAR = re.compile(
    r'^(text:"[^"]*"|visual)'
    r"( \+[1-9]\d* box)?( -[1-9]\d* box)?( \+[1-9]\d* point)?( -[1-9]\d* point)?"
    r"( @\d+)?$"
)


@pytest.mark.parametrize(
    "text,exemplars,frame,label",
    [
        ("cat", (), None, 'text:"cat"'),
        ("red car", (), None, 'text:"red car"'),
        ("cat", [("box", True), ("box", False)], None, 'text:"cat" +1 box -1 box'),
        (None, [("box", True)], 12, "visual +1 box @12"),
        (VISUAL_TEXT, [("point", True), ("point", False)], 3, "visual +1 point -1 point @3"),
        (None, [("point", False), ("point", True), ("point", True)], 30,
         "visual +2 point -1 point @30"),
        ("dog", [("point", True), ("box", False), ("box", True), ("point", False)], None,
         'text:"dog" +1 box -1 box +1 point -1 point'),
        ("dog", [("box", False)], 0, 'text:"dog" -1 box @0'),
    ],
)  # fmt: skip
def test_examples(text, exemplars, frame, label):
    assert query_label(text, exemplars, frame) == label
    assert GRAMMAR.match(label)


def test_frame_is_written_only_with_exemplars():
    """``@frame`` says which source frame the exemplars are on; a text-only prompt has none."""
    assert query_label("cat", (), 7) == 'text:"cat"'
    assert query_label("cat", [("box", True)], 7) == 'text:"cat" +1 box @7'
    assert query_label("cat", [("box", True)]) == 'text:"cat" +1 box'


def test_visual_needs_no_text_and_order_of_exemplars_does_not_matter():
    assert query_label(None) == query_label(VISUAL_TEXT) == "visual"
    a = [("box", True), ("point", False), ("box", False), ("box", True)]
    assert (
        query_label("x", a)
        == query_label("x", list(reversed(a)))
        == 'text:"x" +2 box -1 box -1 point'
    )
    assert query_label("x", iter(a)) == query_label("x", a)  # any iterable, read once


def test_old_video_labels_are_gone():
    labels = [
        query_label("blue disc", [("box", True)], 4),
        query_label(None, [("box", True)], 4),
        query_label(None, [("point", True)], 3),
    ]
    assert labels == ['text:"blue disc" +1 box @4', "visual +1 box @4", "visual +1 point @3"]
    for label in labels:
        assert "+box" not in label and "points:" not in label and GRAMMAR.match(label)
