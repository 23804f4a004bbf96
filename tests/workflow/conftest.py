"""The finished tiny run every workflow test reads (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dag import CORES, run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, datasets) -> Path:
    workdir = tmp_path_factory.mktemp("tiny_run")
    run(workdir, datasets, *CORES)
    return workdir
