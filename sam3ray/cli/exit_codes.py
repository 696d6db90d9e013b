"""Exit codes of ``sam3ray run`` / ``demo`` / ``submit --wait``, for schedulers.

- 0 succeeded: labels and ``runs/<run_id>.json`` written.
- 1 crashed (a bug, a lost cluster, storage down past all retries): committed
  shards are kept; the summary says ``status: failed`` if Ray had started.
- 2 refused before starting (bad config, prompt table, inputs or resources):
  the output is untouched.
- 3 ran, but errors ÷ inputs exceeded ``output.max_error_rate``: labels and
  summary (``status: failed``) written.
- 4 refused: labels were made with other settings and
  ``output.on_settings_change: refuse``; the output is untouched.
- 5 ``submit``: the cluster could not be reached or refused the job.
- 130 interrupted (Ctrl-C): committed shards are kept.

``stats`` / ``export`` / ``preview`` return 0, or 2 for what the user can fix: no
output there, an unknown concept, a write the credentials refuse. Each non-zero code
comes with one line on stderr naming what and where; the README has the table.
"""

from __future__ import annotations

from sam3ray.core.errors import ConfigError, JobFailed, SettingsChanged

OK = 0
CRASH = 1
BAD_CONFIG = 2
ERROR_RATE = 3
SETTINGS_CHANGED = 4
SUBMIT_FAILED = 5
INTERRUPTED = 130


def exit_code_for(exc: BaseException) -> int:
    """The exit code a failed command returns for ``exc``."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, JobFailed):
        return ERROR_RATE
    if isinstance(exc, SettingsChanged):
        return SETTINGS_CHANGED
    if isinstance(exc, ConfigError):
        return BAD_CONFIG
    return CRASH
