"""Sharded store of projected gradient features: safetensors shards + a Parquet manifest.

A shard is ``shard-<i>.safetensors`` (tensor ``features``: one unit-norm row
per successful sample) beside ``shard-<i>.parquet`` (``example_id -> row``,
with failures recorded as ``status="failed"`` and a reason, never as a zero
row). The manifest merges the shard indexes and records each shard's sha256;
the reader refuses a shard whose checksum or metadata does not match.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from clusterucb.infra.io import file_sha256, read_parquet_metadata, read_safetensors_metadata, save_safetensors, write_parquet

log = logging.getLogger(__name__)

FEATURES = "features"
# Metadata that must agree between shards, and with what a reader expects.
IDENTITY_KEYS = (
    "model",
    "checkpoint",
    "grad_type",
    "projector",
    "proj_dim",
    "proj_seed",
    "grad_dim",
    "eps_inside_sqrt",
    "max_length",
    "dtype",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# safetensors dtype -> (numpy dtype to map the bytes as, torch dtype of the view)
_MAPPABLE = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16), "BF16": (np.uint16, torch.bfloat16)}


def mmap_tensor(path: str | Path, name: str = FEATURES) -> torch.Tensor:
    """A zero-copy, memory-mapped view of one tensor of a safetensors file.

    Pages are read on access, so a store larger than RAM can be streamed
    through chunk by chunk. bfloat16 is mapped as uint16 and viewed as bfloat16.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    if name not in header:
        raise KeyError(f"{path}: no tensor {name!r}")
    info = header[name]
    if info["dtype"] not in _MAPPABLE:
        raise ValueError(f"{path}: cannot memory-map dtype {info['dtype']}")
    np_dtype, torch_dtype = _MAPPABLE[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end == begin:  # numpy cannot map zero bytes
        return torch.empty(shape, dtype=torch_dtype)
    array = np.memmap(path, dtype=np_dtype, mode="r", offset=8 + header_size + begin, shape=shape)
    with warnings.catch_warnings():  # a read-only map: torch warns it cannot write to it (we never do)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).view(torch_dtype)


def index_schema():
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("shard", pa.int32(), nullable=False),
            pa.field("row", pa.int32(), nullable=False),  # -1 for a failed sample
            pa.field("status", pa.string(), nullable=False),  # "ok" or "failed"
            pa.field("reason", pa.string()),
            pa.field("loss", pa.float32()),
        ]
    )


def write_shard(
    tensors_path: str | Path,
    index_path: str | Path,
    shard: int,
    example_ids: Sequence[str],
    features: torch.Tensor,
    losses: torch.Tensor,
    failures: dict[int, str],
    meta: dict,
) -> None:
    """Write one shard; rows of ``features`` listed in ``failures`` are left out."""
    import pyarrow as pa

    dtype = meta.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r} (float32, float16, bfloat16)")
    ok = [i for i in range(len(example_ids)) if i not in failures]
    if ok and not torch.isfinite(features[ok]).all():
        raise ValueError("non-finite feature rows that are not recorded as failures")
    rows = np.full(len(example_ids), -1, dtype=np.int32)
    rows[ok] = np.arange(len(ok), dtype=np.int32)
    meta = {key: str(value) for key, value in meta.items()}
    save_safetensors({FEATURES: features[ok].to(DTYPES[dtype])}, tensors_path, {**meta, "shard": str(shard), "n_rows": str(len(ok))})
    table = pa.table(
        {
            "example_id": list(example_ids),
            "shard": np.full(len(example_ids), shard, dtype=np.int32),
            "row": rows,
            "status": ["failed" if i in failures else "ok" for i in range(len(example_ids))],
            "reason": [failures.get(i) for i in range(len(example_ids))],
            "loss": losses.float().numpy(),
        },
        schema=index_schema(),
    )
    write_parquet(table, index_path, {"feature_meta": meta})


def merge_manifest(shards: Sequence[tuple[str | Path, str | Path]], manifest_path: str | Path) -> dict:
    """Merge shard indexes into one manifest; returns the shared feature metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest_path = Path(manifest_path)
    tables, files, reference = [], [], None
    for tensors_path, index_path in shards:
        meta = {k: v for k, v in read_safetensors_metadata(tensors_path).items() if k in IDENTITY_KEYS}
        if reference is None:
            reference = meta
        elif meta != reference:
            diff = {k: (reference.get(k), meta.get(k)) for k in IDENTITY_KEYS if reference.get(k) != meta.get(k)}
            raise ValueError(f"{tensors_path}: metadata differs from the first shard: {diff}")
        tables.append(pq.read_table(index_path))
        files.append(
            {
                "shard": int(read_safetensors_metadata(tensors_path)["shard"]),
                "path": str(Path(tensors_path).resolve().relative_to(manifest_path.parent.resolve())),
                "sha256": file_sha256(tensors_path),
            }
        )
    table = pa.concat_tables(tables)
    ids = table.column("example_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError("an example_id appears in more than one shard")
    n_failed = sum(1 for s in table.column("status").to_pylist() if s != "ok")
    write_parquet(table, manifest_path, {"feature_meta": reference, "shards": files, "n_failed": n_failed})
    log.info("manifest: %d examples in %d shards, %d failed", len(ids), len(files), n_failed)
    return reference


class GradientStore:
    """Reads a manifest's features, checking shard checksums and identity metadata."""

    def __init__(self, manifest_path: str | Path, expect: dict | None = None, verify: bool = True):
        import pyarrow.parquet as pq

        self.path = Path(manifest_path)
        if not self.path.exists():
            raise FileNotFoundError(f"gradient manifest not found: {self.path}")
        meta = read_parquet_metadata(self.path)
        self.meta: dict = meta["feature_meta"]
        self.shards: list[dict] = meta["shards"]
        self.index = pq.read_table(self.path).to_pandas()
        for key, value in (expect or {}).items():
            if str(self.meta.get(key)) != str(value):
                raise ValueError(f"{self.path}: feature metadata {key}={self.meta.get(key)!r}, expected {value!r}")
        if verify:
            for shard in self.shards:
                path = self.path.parent / shard["path"]
                if file_sha256(path) != shard["sha256"]:
                    raise ValueError(f"{path}: checksum does not match the manifest (file changed or truncated)")

    @property
    def proj_dim(self) -> int:
        return int(self.meta["proj_dim"])

    def ok_ids(self) -> list[str]:
        return self.index.loc[self.index.status == "ok", "example_id"].tolist()

    def failures(self) -> dict[str, str]:
        failed = self.index[self.index.status != "ok"]
        return dict(zip(failed.example_id, failed.reason))

    def shard_features(self) -> list[tuple[list[str], torch.Tensor]]:
        """Per shard, its successful ids and a memory-mapped (rows, dim) view in the stored dtype.

        Nothing is read until used: consumers stream over the shards (and over
        row chunks of each) instead of loading the store.
        """
        return list(self.iter_shard_features())

    def iter_shard_features(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """:meth:`shard_features` one shard at a time: a consumer that drops each view unmaps it, so the
        pages it read leave the job's resident set (one pass over the store keeps one shard resident)."""
        ok = self.index[self.index.status == "ok"]
        paths = {int(s["shard"]): self.path.parent / s["path"] for s in self.shards}
        for shard_id, group in ok.groupby("shard", sort=True):
            rows = group.row.to_numpy()
            features = mmap_tensor(paths[int(shard_id)])
            if len(rows) != features.shape[0] or not (rows == np.arange(len(rows))).all():
                raise ValueError(f"{paths[int(shard_id)]}: rows in the manifest do not match the shard")
            yield group.example_id.tolist(), features

    def load(self) -> tuple[list[str], torch.Tensor]:
        """All successful rows as one float32 tensor in manifest order (a copy; small stores only)."""
        parts = self.shard_features()
        ids = [i for part_ids, _ in parts for i in part_ids]
        if not parts:
            return ids, torch.empty(0, self.proj_dim)
        return ids, torch.cat([features.float() for _, features in parts])
