"""Checks and views of a loaded ``JobConfig`` that need more than the schema.

``validate_paths`` touches storage (and needs credentials), so it is apart from
parsing; it runs on the driver before Ray starts. ``redact`` is the config as
it may appear in logs and run summaries.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from sam3ray.config.schema import JobConfig, is_hub_id
from sam3ray.core.errors import ConfigError
from sam3ray.core.uri import covers, has_glob, hide_userinfo
from sam3ray.storage.location import Location

_SECRET_TOKENS = {"key", "secret", "token", "password", "passwd", "credentials", "credential"}
_SECRET_PARTS = ("secret", "password", "token", "credential", "access_key")


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
        return hide_userinfo(obj)
    return obj


def redact(cfg: JobConfig | Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able config without secrets, for run summaries and logs.

    Keys that look like credentials are masked anywhere in the tree (not only under
    ``storage_options``: a secret in the wrong place must not leak either), and
    ``user:password@`` in URLs is masked.
    """
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
    return _redact(data)


def where(cfg: JobConfig) -> str:
    """``"<file>: "`` for error messages when the config came from a file."""
    return f"{cfg.source}: " if cfg.source else ""


def _check_exists(cfg: JobConfig, field: str, loc: Location) -> None:
    try:
        found = loc.exists()
    except Exception as exc:  # credentials, network, missing fsspec backend
        raise ConfigError(f"{where(cfg)}{field}: cannot check {loc.uri}: {exc}") from None
    if not found:
        raise ConfigError(f"{where(cfg)}{field}: not found: {loc.uri}")


def validate_paths(cfg: JobConfig) -> None:
    """Check that tables, manifest and checkpoint exist and that output is not inside input.

    Writing labels under an input prefix would make the next run list them as
    inputs (or the overwrite mode delete inputs), so that is refused up front.
    """
    _check_exists(cfg, "prompts.concepts", cfg.input.location(cfg.prompts.concepts))
    if cfg.prompts.geometric:
        _check_exists(cfg, "prompts.geometric", cfg.input.location(cfg.prompts.geometric))
    for i, manifest in enumerate(cfg.input.manifests()):
        loc = cfg.input.location(manifest)
        if not has_glob(loc.path):
            field = (
                "input.manifest" if isinstance(cfg.input.manifest, str) else f"input.manifest[{i}]"
            )
            _check_exists(cfg, field, loc)
    if cfg.input.inventory:
        _check_exists(cfg, "input.inventory", cfg.input.location(cfg.input.inventory))
    ckpt = cfg.model.checkpoint
    if not (is_hub_id(ckpt) and not os.path.exists(ckpt)) and not ckpt.startswith("hf://"):
        _check_exists(cfg, "model.checkpoint", cfg.checkpoint_location)
    for uri in cfg.input.uris:
        if covers(uri, cfg.output.uri):
            raise ConfigError(
                f"{where(cfg)}output.uri: {cfg.output.uri} lies inside input {uri}; its "
                "files would be listed as inputs on the next run: choose another output."
            )
