"""The house rules that keep the tree readable, checked on every run.

- the import contract in pyproject.toml (``lint-imports``: packages by layer, ray only
  in runner/, torch and sam3 only in model/, analytics never reaches the model);
- no module imports another package's ``_private`` names;
- ``import sam3ray`` (and the config, the planner) stays light: no torch, sam3 or ray.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "sam3ray"


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def test_no_private_names_cross_packages() -> None:
    crossings = []
    for module, path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if not (node.module or "").startswith("sam3ray"):
                continue
            if _package_of(node.module) == _package_of(module):
                continue
            hidden = [a.name for a in node.names if a.name.startswith("_")]
            hidden += [p for p in node.module.split(".") if p.startswith("_")]
            if hidden:
                crossings.append(f"{module} imports {hidden} from {node.module}")
    assert crossings == []


def test_import_contract_holds() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    proc = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("module", ["sam3ray", "sam3ray.config", "sam3ray.plan.job"])
def test_driver_side_imports_stay_light(module: str) -> None:
    code = (
        f"import sys, {module}; heavy = [m for m in ('torch', 'sam3', 'ray') if m in sys.modules];"
        " assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
