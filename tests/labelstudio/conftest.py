"""The Label Studio tier: the real Label Studio app, started on 127.0.0.1 for the session.

Label Studio pins its own Django stack, so it lives in its own virtual environment,
never in sam3ray's. The tier runs when a ``label-studio`` executable is found:
``$SAM3RAY_LABEL_STUDIO``, then ``.lsvenv/bin/label-studio`` in the repository (what
``.ci/run`` installs), then ``label-studio`` on ``PATH``; otherwise it is skipped::

    python3 -m venv .lsvenv && .lsvenv/bin/pip install label-studio==1.23.2
    .venv/bin/pytest -m labelstudio tests/labelstudio

The server gets a fresh data directory, a user with a legacy API token, local-files
serving on a document root the tests write their images under, S3 storages allowed on
127.0.0.1 (the moto server), and no version check against the internet.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_HERE = Path(__file__).resolve().parent
TOKEN = "sam3ray0test0token0000000000000000000000"


def pytest_collection_modifyitems(config, items) -> None:
    """Every test under tests/labelstudio/ carries the ``labelstudio`` marker."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.labelstudio)


def label_studio_executable() -> str | None:
    candidates = [os.environ.get("SAM3RAY_LABEL_STUDIO"), str(REPO / ".lsvenv/bin/label-studio"),
                  shutil.which("label-studio")]  # fmt: skip
    return next((c for c in candidates if c and Path(c).is_file()), None)


@dataclass
class LabelStudio:
    """A running Label Studio: its URL, document root, and an authorised HTTP session."""

    url: str
    document_root: Path
    session: object  # requests.Session with the API token

    def api(self, method: str, path: str, **kwargs):
        """Call the REST API; fail with Label Studio's own answer on an HTTP error."""
        response = self.session.request(method, self.url + path, timeout=120, **kwargs)
        assert response.status_code < 400, (
            f"{method} {path}: {response.status_code} " + (response.text[:2000])
        )
        return response.json() if response.content else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    import requests

    exe = label_studio_executable()
    if exe is None:
        pytest.skip("label-studio is not installed (see tests/labelstudio/conftest.py)")
    base = tmp_path_factory.mktemp("label-studio")
    root = base / "docroot"
    root.mkdir()
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
        # The moto S3 server is on 127.0.0.1, which Label Studio's SSRF guard refuses by
        # default; an object store on a private network (MinIO) needs the same setting.
        "USE_DEFAULT_BANNED_SUBNETS": "false",
    }
    log = open(base / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    cmd = [exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail("label-studio exited: " + (base / "server.log").read_text()[-3000:])
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("label-studio did not answer /health within 300 s")
            time.sleep(1)
        session = requests.Session()
        session.headers["Authorization"] = f"Token {TOKEN}"
        yield LabelStudio(url, root, session)
    finally:
        _stop(proc)
        log.close()


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
