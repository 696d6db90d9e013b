"""Read a job file: YAML, ``--set`` overrides, relative paths, validation.

Parsing stays free of storage access (that is :mod:`sam3ray.config.checks`), so
a config can be loaded and inspected anywhere, e.g. by ``sam3ray plan`` on a
laptop without credentials.
"""

from __future__ import annotations

import copy
import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sam3ray.config.schema import JobConfig, is_hub_id
from sam3ray.core.errors import ConfigError
from sam3ray.core.uri import has_glob, has_scheme


def _fmt_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":  # most likely a typo: show what is allowed
            model: Any = JobConfig
            for part in e["loc"][:-1]:
                model = JobConfig.model_fields[part].annotation if model is JobConfig else None
            if model is not None:
                msg += f" (allowed: {', '.join(model.model_fields)})"
        lines.append(f"{source}: {_fmt_loc(e['loc'])}: {msg}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
        node = data
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or an empty section ("video:")
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
        node[parts[-1]] = value
    return data


def _resolve_local(value: Any, base: Path, *, hub_ok: bool = False) -> Any:
    """Absolute path for a relative local path: cwd first, the config's dir as fallback.

    Users type paths relative to where they run the CLI; a config shipped with its
    tables next to it should still work from elsewhere. Ray workers need absolute paths.
    """
    if not isinstance(value, str) or not value or has_scheme(value):
        return value
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return path

    def exists(p: str) -> bool:
        if has_glob(p):  # lazily: a huge folder must not be walked in full
            return next(glob.iglob(p, recursive=True), None) is not None
        return os.path.exists(p)

    if not exists(path) and exists(str(base / path)):
        return str((base / path).absolute())
    if hub_ok and not exists(path) and is_hub_id(value):
        return value
    return os.path.abspath(path)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    sections = {k: data.get(k) for k in ("input", "prompts", "model", "output")}
    inp, prompts, model, output = (s if isinstance(s, dict) else None for s in sections.values())
    if inp is not None:
        if isinstance(inp.get("uris"), list):
            inp["uris"] = [_resolve_local(u, base) for u in inp["uris"]]
        if isinstance(inp.get("manifest"), list):
            inp["manifest"] = [_resolve_local(m, base) for m in inp["manifest"]]
        elif "manifest" in inp:
            inp["manifest"] = _resolve_local(inp["manifest"], base)
        if "inventory" in inp:
            inp["inventory"] = _resolve_local(inp["inventory"], base)
    for section, keys in ((prompts, ("concepts", "geometric")), (output, ("uri",))):
        for key in keys if section is not None else ():
            if key in section:
                section[key] = _resolve_local(section[key], base)
    if model is not None:
        if "checkpoint" in model:
            model["checkpoint"] = _resolve_local(model["checkpoint"], base, hub_ok=True)
        if "cache_dir" in model:
            model["cache_dir"] = _resolve_local(model["cache_dir"], base)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML job file, apply ``--set`` overrides, resolve paths, validate."""
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        data = apply_overrides(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _resolve_paths(data, Path(path).resolve().parent)
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None
    return cfg.with_source(source)
