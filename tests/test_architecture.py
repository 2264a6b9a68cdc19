"""The package layout as the architecture says (docs/ARCHITECTURE.md): import contracts, module size, docstrings."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: install the test extra (python -m pip install -e '.[test]')")
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHONPATH": str(cwd)}
    return subprocess.run([exe, "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


@pytest.mark.parametrize("module, bad_import, contract", [
    ("types.py", "import pipeline.segmentation.segment", "Layers"),          # the core reaching up to a stage
    ("segmentation/grid.py", "import pipeline.report.overlays", "Layers"),   # a stage importing an output writer
    ("batch/study.py", "import pipeline.training.samples", "never imports training"),
    ("io/nifti.py", "import pipeline.io.masks", "No import cycles"),         # masks imports nifti: a cycle
])
def test_import_contracts_fail_on_a_forbidden_import(tmp_path, module, bad_import, contract):
    """The contracts can fail: a copy of the package with one forbidden import breaks the named contract."""
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("models", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "pipeline" / module
    target.write_text(target.read_text() + f"\n{bad_import}  # planted by the test\n")
    res = _lint_imports(tmp_path)
    assert res.returncode != 0, res.stdout
    broken = res.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, res.stdout


def _modules():
    return sorted(p for p in (ROOT / "pipeline").rglob("*.py"))


def test_no_module_is_longer_than_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_module_opens_with_a_docstring_that_says_what_it_owns():
    missing = [str(p.relative_to(ROOT)) for p in _modules() if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert not missing, f"modules without a docstring: {missing}"


def test_training_code_is_apart_from_the_code_users_run():
    """Nothing a user runs imports PyTorch; the trainers live in pipeline.training only."""
    users = [p for p in _modules() if "training" not in p.parts]
    torch = [str(p.relative_to(ROOT)) for p in users if "import torch" in p.read_text()]
    assert not torch, torch
    assert not list((ROOT / "pipeline").glob("train_*.py"))
