"""The Label Studio tier: the real Label Studio app, started on 127.0.0.1 for the session.

Runs when a ``label-studio`` executable is found (``tests/support/labelstudio.py``),
skipped otherwise. From a checkout::

    python3 -m venv .lsvenv && .lsvenv/bin/pip install label-studio==1.23.2
    .venv/bin/pytest -m labelstudio tests/labelstudio
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.labelstudio import label_studio_executable, running_label_studio

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items) -> None:
    """Every test under tests/labelstudio/ carries the ``labelstudio`` marker."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.labelstudio)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    exe = label_studio_executable()
    if exe is None:
        pytest.skip("label-studio is not installed (see tests/support/labelstudio.py)")
    with running_label_studio(exe, tmp_path_factory.mktemp("label-studio")) as ls:
        yield ls
