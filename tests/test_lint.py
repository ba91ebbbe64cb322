"""The code base stays ruff clean. Under CI (CI=true) a missing ruff fails: the gate never
passes silently; elsewhere it skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def find_ruff() -> str | None:
    """ruff on PATH, or beside this interpreter (a virtual environment not activated)."""
    return shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))


def test_ruff_clean() -> None:
    ruff = find_ruff()
    if ruff is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("ruff is not installed, but CI=true: install the test extra (.[test])")
        pytest.skip("ruff is not installed")
    proc = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout


def test_missing_ruff_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    assert find_ruff() is None
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="ruff is not installed, but CI=true"):
        test_ruff_clean()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        test_ruff_clean()
