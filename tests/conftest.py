"""Shared fixtures: where the staged datasets are, and tiny random models built in-process (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def datasets_dir() -> Path:
    """$CLUSTERUCB_DATASETS, else ../shared/datasets beside the repository (CI's layout)."""
    return Path(os.environ.get("CLUSTERUCB_DATASETS", REPO.parent / "shared" / "datasets")).resolve()


@pytest.fixture(scope="session")
def datasets() -> Path:
    path = datasets_dir()
    if not path.is_dir():
        pytest.skip(f"staged datasets not found at {path} (set CLUSTERUCB_DATASETS)")
    return path
