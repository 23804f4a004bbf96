"""The selection, draws and score tables every selection stage reads or writes (Parquet, explicit schemas)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clusterucb.io import read_parquet_metadata, write_parquet

log = logging.getLogger(__name__)


def selection_schema():
    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),
            pa.field("score", pa.float32()),  # influence at the selecting checkpoint; null for random
            pa.field("cluster", pa.int32()),  # k-means cluster; null when not clustered
        ]
    )


def draws_schema():
    return pa.schema(
        [
            pa.field("draw", pa.int32(), nullable=False),
            pa.field("step", pa.int32(), nullable=False),
            pa.field("phase", pa.string(), nullable=False),
            pa.field("cluster", pa.int32()),  # the arm's k-means cluster; null for random_draw (one arm, no clusters read)
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("score", pa.float32()),  # NaN: the sample's gradient failed
            pa.field("arm_value", pa.float32()),  # the policy's index of the arm when chosen
        ]
    )


def scores_schema():
    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("score", pa.float32()),  # max over subtasks; NaN for a failed sample
            pa.field("subtask_scores", pa.list_(pa.float32())),  # mean over each subtask's validation examples
        ]
    )


def write_selection(ids: list[str], scores, clusters, out: str, meta: dict) -> None:
    table = pa.table(
        {
            "example_id": ids,
            "rank": np.arange(1, len(ids) + 1, dtype=np.int32),
            "score": pa.array(scores, pa.float32()) if scores is not None else pa.nulls(len(ids), pa.float32()),
            "cluster": pa.array(clusters, pa.int32()) if clusters is not None else pa.nulls(len(ids), pa.int32()),
        },
        schema=selection_schema(),
    )
    write_parquet(table, out, meta)
    log.info("selected %d examples (%s)", len(ids), ", ".join(f"{k}={v}" for k, v in meta.items() if k in ("method", "epoch", "n_gradients")))


def read_scores(path: str) -> tuple[list[str], np.ndarray, dict]:
    table = pq.read_table(path, columns=["example_id", "score"])
    return table.column("example_id").to_pylist(), table.column("score").to_numpy(zero_copy_only=False).astype(np.float64), read_parquet_metadata(path)


def read_assignments(path: str) -> dict[str, int]:
    table = pq.read_table(path, columns=["example_id", "cluster"])
    return dict(zip(table.column("example_id").to_pylist(), table.column("cluster").to_pylist()))
