"""The error types every layer raises and the CLI maps to exit codes.

They live at the bottom so that a lower layer can raise what an upper layer
catches without importing it (the planner raises ``ConfigError`` for a refused
settings change; the CLI turns it into exit code 2).
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """The job cannot start as configured; the message names the file, row and field.

    Exit code 2: nothing was started and nothing was deleted.
    """


class StorageError(ConfigError):
    """No filesystem can serve a URI (unknown scheme, missing fsspec backend)."""


class InputError(ConfigError):
    """The inputs cannot be listed as configured (nothing matched, refused path, bad manifest)."""


class PromptTableError(ConfigError):
    """A prompt table is invalid; the message names the file, the row and the field."""


class SettingsChanged(ConfigError):
    """``output.on_settings_change: refuse`` and committed labels came from other settings.

    Exit code 4: a person decides (restore the settings, relabel, or a new output).
    """


class DecodeError(ValueError):
    """An input that is not usable (it becomes one error row with ``reason``).

    Images: empty, not_an_image, unsupported, too_large, truncated, corrupt;
    videos add not_found, beyond_end, variable_frame_rate, unsupported_codec.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[DecodeError], tuple[str, str]]:
        # Error rows cross process boundaries (Ray pickles exceptions).
        return DecodeError, (self.reason, self.message)


class JobFailed(RuntimeError):
    """The job ran but broke a promise (error rate above ``output.max_error_rate``).

    Exit code 3. ``summary`` is the run summary, also written to ``runs/``.
    """

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def error_reason(exc: BaseException) -> str:
    """The ``error_reason`` code of an input that failed with ``exc``."""
    if isinstance(exc, DecodeError):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, PermissionError):
        return "forbidden"
    return "read_failed"


def error_text(exc: BaseException, limit: int = 500) -> str:
    """The ``error`` column: type and message, bounded (a traceback is for the logs)."""
    return f"{type(exc).__name__}: {exc}"[:limit]
