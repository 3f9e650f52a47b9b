"""House rules that keep the code easy to see and change: lint and format clean, and a library that
never reaches into the orchestration layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"

# The registered reward model's pyfunc wrapper is the one module of the library that imports MLflow:
# MLflow loads it by path inside a serving process where only rlhf_core travels with the model, so it
# must live in the library and subclass mlflow.pyfunc.PythonModel there.
MLFLOW_ALLOWED = {"rlhf_core/reward/pyfunc_model.py", "rlhf_core/reward/serving.py"}
FORBIDDEN = ("prefect", "tasks", "flows")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_the_orchestration_layer():
    offenders = []
    for path in sorted((ROOT / "rlhf_core").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        imported = _imports(path)
        offenders += [f"{rel} imports {name}" for name in FORBIDDEN if name in imported]
        if "mlflow" in imported and rel not in MLFLOW_ALLOWED:
            offenders.append(f"{rel} imports mlflow")
    assert not offenders, offenders


def test_no_two_modules_share_a_name_within_the_product():
    names: dict[str, list[str]] = {}
    for folder in ("rlhf_core", "tasks", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "__init__.py":
                names.setdefault(path.name, []).append(path.relative_to(ROOT).as_posix())
    repeated = {k: v for k, v in names.items() if len(v) > 2}
    assert not repeated, repeated


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_clean(command):
    if not RUFF.exists():
        pytest.fail("ruff is not installed in this environment: make install")
    run = subprocess.run([str(RUFF), *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
