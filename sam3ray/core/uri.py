"""The one place that parses a URI: scheme, local or object store, globs, prefixes.

Every layer used to carry its own regex for "has a scheme" or "is a glob", and
they disagreed on ``file://`` and on scheme aliases. These functions are pure
string work (no filesystem), so the config, the planner and the writer can all
use them without touching storage.
"""

from __future__ import annotations

import os
import re

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_GLOB_CHARS = re.compile(r"[*?\[]")
_URL_USERINFO = re.compile(r"^([a-zA-Z][\w+.-]*://)[^/@\s]+@")
LOCAL_SCHEMES = frozenset({"file", "local"})
#: Spellings of one store folded to one name (s3a/s3n are Hadoop's, gcs is gcsfs's).
SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "local": "file"}


def scheme(uri: str) -> str | None:
    """The lower-case scheme of ``uri`` (``s3``, ``file``), or None for a plain path."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else None


def has_scheme(uri: str) -> bool:
    return scheme(uri) is not None


def is_object_store(uri: str) -> bool:
    """True for any URI with a non-local scheme (s3://, gs://, https://, …)."""
    s = scheme(uri)
    return s is not None and s not in LOCAL_SCHEMES


def store_family(uri: str) -> str:
    """The scheme with aliases folded (s3a/s3n -> s3, gcs -> gs); ``file`` for paths."""
    s = scheme(uri) or "file"
    return SCHEME_ALIASES.get(s, s)


def _strip_local_scheme(uri: str) -> str:
    """``uri`` without a local scheme (``file://``, ``local://``, any case)."""
    return uri.partition("://")[2] if scheme(uri) in LOCAL_SCHEMES else uri


def local_path(uri: str) -> str:
    """An absolute local path for a path or ``file://``/``local://`` URI (``~`` expanded)."""
    return os.path.abspath(os.path.expanduser(_strip_local_scheme(uri)))


def has_glob(uri: str) -> bool:
    return bool(_GLOB_CHARS.search(uri))


def literal_prefix(uri: str) -> str:
    """The part of ``uri`` before its first glob character (what a listing starts from)."""
    m = _GLOB_CHARS.search(uri)
    return uri[: m.start()] if m else uri


def rejoin(uri: str, path: str) -> str:
    """A path listed by a filesystem back to a full URI with the scheme the user wrote."""
    s = _SCHEME.match(uri)
    if not s or s.group(1).lower() in LOCAL_SCHEMES:
        return path
    return f"{s.group(1)}://{path.lstrip('/')}"


def normalize(uri: str) -> str:
    """A comparable form: scheme aliases folded, slashes collapsed, local paths made real."""
    uri = _strip_local_scheme(uri)
    if has_scheme(uri):
        rest = uri.partition("://")[2]
        return f"{store_family(uri)}://{re.sub(r'/+', '/', rest).rstrip('/')}"
    return os.path.realpath(os.path.expanduser(uri)).rstrip("/") or "/"


def covers(prefix_uri: str, target: str) -> bool:
    """Whether ``target`` lies in what listing ``prefix_uri`` (a path, prefix or glob) reaches."""
    out = normalize(target)
    literal = literal_prefix(prefix_uri)
    base = normalize(literal) if literal else "/"
    if literal != prefix_uri and not literal.endswith("/"):
        return out.startswith(base)  # glob "imgs*" also covers "imgs_x/"
    return out == base or out.startswith(base.rstrip("/") + "/")


def canonical_input(uri: str) -> str:
    """An input URI as listings return it: local paths absolute, object-store URIs unchanged.

    Prompt tables name images by URI; both sides must agree on this form.
    """
    if is_object_store(uri):
        return uri
    return local_path(uri)


def hide_userinfo(text: str) -> str:
    """``scheme://user:password@host`` with the user info masked (for logs and summaries)."""
    return _URL_USERINFO.sub(r"\1***@", text)
