"""Start the real Label Studio on 127.0.0.1 (its own venv) and talk to its REST API.

Used by the ``tests/labelstudio`` tier and by ``benchmarks/labelstudio_app.py``. Label
Studio pins its own Django stack, so it is never installed into sam3ray's venv; the
executable is found as ``$SAM3RAY_LABEL_STUDIO``, then ``.lsvenv/bin/label-studio`` in
the repository (what ``.ci/run`` installs), then ``label-studio`` on ``PATH``.

The server gets a fresh data directory, a user with a legacy API token, local-files
serving on ``document_root``, S3 storages allowed on 127.0.0.1 (a moto server; an object
store on a private network, e.g. MinIO, needs the same setting), and no version check
against the internet.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TOKEN = "sam3ray0test0token0000000000000000000000"


def label_studio_executable() -> str | None:
    candidates = [os.environ.get("SAM3RAY_LABEL_STUDIO"), str(REPO / ".lsvenv/bin/label-studio"),
                  shutil.which("label-studio")]  # fmt: skip
    found = next((c for c in candidates if c and Path(c).is_file()), None)
    # Absolute: Label Studio is started with cwd= its data dir, where a relative path
    # (.ci/run passes .lsvenv/bin/label-studio) would not resolve. abspath, not
    # resolve(): a venv's executables may be symlinks that must stay in the venv.
    return os.path.abspath(found) if found else None


@dataclass
class LabelStudio:
    """A running Label Studio: its URL, document root, and an authorised HTTP session."""

    url: str
    document_root: Path
    session: Any  # requests.Session with the API token
    startup_s: float = 0.0

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the REST API; fail with Label Studio's own answer on an HTTP error."""
        response = self.session.request(method, self.url + path, timeout=600, **kwargs)
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text[:2000]}")
        return response.json() if response.content else None


class LabelStudioFailed(RuntimeError):
    """Label Studio exited or did not answer in time (the message ends with its log)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_label_studio(
    exe: str, base: Path, *, document_root: Path | None = None, timeout: float = 300
) -> Iterator[LabelStudio]:
    """Label Studio (data in ``base``) serving local files under ``document_root``
    (default ``base/docroot``) for as long as the context lasts."""
    import requests

    root = document_root or base / "docroot"
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"),
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LABEL_STUDIO_USERNAME": "sam3ray@example.com",
        "LABEL_STUDIO_PASSWORD": "sam3ray-test-password",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "USE_DEFAULT_BANNED_SUBNETS": "false",
    }
    log_path = base / "server.log"
    cmd = [exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                if proc.poll() is not None:
                    raise LabelStudioFailed("label-studio exited: " + log_path.read_text()[-3000:])
                with contextlib.suppress(requests.RequestException):
                    if requests.get(url + "/health", timeout=5).status_code == 200:
                        break
                if time.monotonic() - t0 > timeout:
                    raise LabelStudioFailed(
                        f"no answer on /health within {timeout:.0f} s: "
                        + log_path.read_text()[-3000:]
                    )
                time.sleep(1)
            session = requests.Session()
            session.headers["Authorization"] = f"Token {TOKEN}"
            yield LabelStudio(url, root, session, time.monotonic() - t0)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in a session of its own),
    SIGKILL it if it does not go within 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def create_project(ls: LabelStudio, title: str, config: str, tasks: list[dict],
                   storage: tuple[str, dict[str, Any]]) -> int:  # fmt: skip
    """A project with ``config``, a storage (kind, fields) and ``tasks`` imported."""
    project = ls.api("POST", "/api/projects", json={"title": title, "label_config": config})
    kind, fields = storage
    ls.api("POST", f"/api/storages/{kind}", json={"project": project["id"], **fields})
    done = ls.api("POST", f"/api/projects/{project['id']}/import", json=tasks)
    if done["task_count"] != len(tasks):
        raise AssertionError(f"imported {done['task_count']} of {len(tasks)} tasks")
    expected = sum(len(t["predictions"]) for t in tasks)
    if done["prediction_count"] != expected:
        raise AssertionError(f"imported {done['prediction_count']} of {expected} predictions")
    return project["id"]


def project_tasks(ls: LabelStudio, project: int) -> list[dict]:
    """Every task of the project with its predictions, as Label Studio stores them."""
    found = ls.api("GET", "/api/tasks", params={"project": project, "page_size": 100_000,
                                                "fields": "all"})  # fmt: skip
    tasks = found["tasks"] if isinstance(found, dict) else found
    for task in tasks:
        task["predictions"] = ls.api("GET", "/api/predictions", params={"task": task["id"]})
    return tasks
