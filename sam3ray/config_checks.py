"""Checks and views of a loaded JobConfig: secret redaction for logs and run
summaries, and the existence/overlap checks of every path it names (run on the
driver before Ray starts)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from sam3ray.config import _GLOB_CHARS, ConfigError, JobConfig, is_hub_id
from sam3ray.inputs import filesystem_for, has_scheme

_SECRET_TOKENS = {"key", "secret", "token", "password", "passwd", "credentials", "credential"}
_SECRET_PARTS = ("secret", "password", "token", "credential", "access_key")
_URL_USERINFO = re.compile(r"^([a-zA-Z][\w+.-]*://)[^/@\s]+@")


def _is_secret_key(name: str) -> bool:
    low = name.lower()
    return any(p in low for p in _SECRET_PARTS) or bool(
        set(re.split(r"[^a-z0-9]+", low)) & _SECRET_TOKENS
    )


def _redact(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: "***" if _is_secret_key(str(k)) else _redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact(v) for v in obj]
    if isinstance(obj, str):
        return _URL_USERINFO.sub(r"\1***@", obj)
    return obj


def redact(cfg: JobConfig | Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able config without secrets, for run summaries and logs.

    Keys that look like credentials are masked anywhere in the tree (not only under
    ``storage_options``: a secret in the wrong place must not leak either), and
    ``user:password@`` in URLs is masked.
    """
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
    return _redact(data)


def _norm_location(uri: str) -> str:
    """Comparable form of a path or URI: scheme aliases folded, local paths made real."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if has_scheme(uri):
        scheme, _, rest = uri.partition("://")
        scheme = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}.get(scheme.lower(), scheme.lower())
        return f"{scheme}://{re.sub(r'/+', '/', rest).rstrip('/')}"
    return os.path.realpath(os.path.expanduser(uri)).rstrip("/") or "/"


def _input_prefix(uri: str) -> str:
    """The literal part of a URI before any glob character (the prefix it can list)."""
    m = _GLOB_CHARS.search(uri)
    return uri[: m.start()] if m else uri


def _check_exists(cfg: JobConfig, field: str, uri: str, options: Mapping[str, Any]) -> None:
    prefix = _prefix(cfg)
    try:
        fs, path = filesystem_for(uri, options)
        found = fs.exists(path)
    except Exception as exc:  # credentials, network, missing fsspec backend
        raise ConfigError(f"{prefix}{field}: cannot check {uri}: {exc}") from None
    if not found:
        raise ConfigError(f"{prefix}{field}: not found: {uri}")


def validate_paths(cfg: JobConfig) -> None:
    """Check that tables, manifest and checkpoint exist and that output is not inside input.

    Separate from parsing because it touches storage (and needs credentials). Writing
    labels under an input prefix would make the next run list them as inputs (or the
    overwrite mode delete inputs), so that is refused up front.
    """
    opts = cfg.input.storage_options
    _check_exists(cfg, "prompts.concepts", cfg.prompts.concepts, opts)
    if cfg.prompts.geometric:
        _check_exists(cfg, "prompts.geometric", cfg.prompts.geometric, opts)
    if cfg.input.manifest:
        _check_exists(cfg, "input.manifest", cfg.input.manifest, opts)
    ckpt = cfg.model.checkpoint
    if not (is_hub_id(ckpt) and not os.path.exists(ckpt)) and not ckpt.startswith("hf://"):
        _check_exists(cfg, "model.checkpoint", ckpt, cfg.model_storage_options)

    out = _norm_location(cfg.output.uri)
    for uri in cfg.input.uris:
        if _covers(uri, out):
            raise ConfigError(
                f"{_prefix(cfg)}output.uri: {cfg.output.uri} lies inside input {uri}; its "
                "files would be listed as inputs on the next run: choose another output."
            )


def _covers(input_uri: str, out: str) -> bool:
    """Whether the normalized output location lies in what ``input_uri`` can list."""
    literal = _input_prefix(input_uri)
    base = _norm_location(literal) if literal else "/"
    if literal != input_uri and not literal.endswith("/"):
        return out.startswith(base)  # glob "imgs*" also covers "imgs_x/"
    return out == base or out.startswith(base.rstrip("/") + "/")


def _prefix(cfg: JobConfig) -> str:
    return f"{cfg._source}: " if cfg._source else ""
