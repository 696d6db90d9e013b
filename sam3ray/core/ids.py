"""Stable ids: every output name derives from these, so they must never change.

An input's id is a hash of its URI, a shard's id a hash of its first member's
URI (images) or of its video and first frame (videos), a membership hash a
hash of the sorted member ids. The same inputs therefore give the same file
names on every machine and every run, which is what makes retries and resumes
overwrite instead of duplicate.
"""

from __future__ import annotations

import hashlib


def stable_id(text: str, n: int = 16) -> str:
    """A short, stable hex id (sha1 prefix) of a string such as a URI."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def input_id(uri: str) -> str:
    """The id of an input (``image_id`` in every table; a video's id too)."""
    return stable_id(uri)


def video_shard_id(video_id: str, first_frame: int) -> str:
    """Shard id of a video shard: the video and the first source frame it decodes."""
    return f"v{video_id}-{first_frame:07d}"
