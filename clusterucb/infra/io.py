"""Atomic, self-describing artefacts: Parquet tables and safetensors files.

Every writer goes to a temporary name in the destination directory and is
renamed into place only when complete, so a killed job never leaves a file
that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from clusterucb.infra import paths

SCHEMA_VERSION = "1"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory whose files are moved into ``path`` on success.

    ``last`` names the file moved last (the one downstream rules declare), so a
    crash half-way through the moves leaves the declared output missing.
    """
    final = Path(path)
    final.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir())
        if last is not None:
            if last not in names:
                raise FileNotFoundError(f"{last} was not written into {tmp}")
            names.remove(last)
            names.append(last)
        for name in names:
            target = final / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def scratch_dir_for(output: str | os.PathLike, results: str | os.PathLike = paths.RESULTS) -> Path:
    """The job's own resumable-state directory: ``<results>/scratch/`` + ``output`` without its suffix (``paths.SCRATCH``).

    Keyed by the job's first output (unique per job), never by its directory: the
    shards of one pool share a directory and run concurrently, and one shard
    clearing its finished scratch must not delete another's.
    """
    rel = Path(os.path.relpath(output, results))
    if rel.parts[0] == os.pardir:
        raise ValueError(f"output {output} is not under {results}")
    return Path(results) / paths.SCRATCH_NAME / rel.with_suffix("")


def config_hash(obj: Any) -> str:
    """Short sha256 of the canonical JSON of ``obj`` (a result's provenance key)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_parquet(table, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Write a pyarrow Table atomically; ``metadata`` values are JSON-encoded into the schema."""
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **encode_metadata(metadata)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=64 * 1024)


def encode_metadata(metadata: Mapping[str, Any] | None) -> dict[bytes, bytes]:
    """Schema metadata of an Arrow table: ``clusterucb.<key>`` -> JSON, plus the schema version."""
    meta = {b"clusterucb.schema_version": SCHEMA_VERSION.encode()}
    for key, value in (metadata or {}).items():
        meta[f"clusterucb.{key}".encode()] = json.dumps(value, default=str).encode()
    return meta


def decode_metadata(raw: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    """The ``clusterucb.*`` entries of Arrow schema metadata, JSON-decoded (plain strings kept as such)."""
    out = {}
    for key, value in (raw or {}).items():
        key = key.decode()
        if key.startswith("clusterucb."):
            try:
                out[key[len("clusterucb.") :]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len("clusterucb.") :]] = value.decode()
    return out


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``clusterucb.*`` key/value metadata of a Parquet file, JSON-decoded."""
    import pyarrow.parquet as pq

    return decode_metadata(pq.read_schema(path).metadata)


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """Save tensors with string metadata (non-string values JSON-encoded), atomically."""
    from safetensors.torch import save_file

    meta = {"schema_version": SCHEMA_VERSION}
    for key, value in metadata.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
