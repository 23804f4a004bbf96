"""Lint as CI checks it: ruff's rules and formatting (pyproject.toml [tool.ruff]); snakefmt is checked beside the
workflow tests (tests/workflow/test_workflow.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_ruff_finds_nothing():
    proc = ruff("check", "--output-format", "concise", ".")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_code_is_ruff_formatted():
    proc = ruff("format", "--check", ".")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
