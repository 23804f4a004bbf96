"""The selection, draws and score tables every selection stage reads or writes (Parquet, explicit schemas)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clusterucb.infra.io import read_parquet_metadata, write_parquet

log = logging.getLogger(__name__)


def selection_schema():
    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("id", pa.string()),  # the pool row's own id (null when it has none)
            pa.field("dataset", pa.string()),  # the pool row's own dataset field
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


def pool_provenance(pool_table: str, example_ids: list[str]) -> tuple[pa.Array, pa.Array]:
    """The pool rows' own ``id`` and ``dataset`` for ``example_ids`` (in that order); an id not in the pool is an error."""
    pool = pq.read_table(pool_table, columns=["example_id", "id", "dataset"])
    where = pc.index_in(pa.array(example_ids, pa.string()), value_set=pool.column("example_id").combine_chunks())
    if where.null_count:
        missing = [e for e, w in zip(example_ids, where.to_pylist()) if w is None]
        raise ValueError(f"{pool_table}: {len(missing)} selected examples are not in the pool, e.g. {missing[:3]}")
    return pool.column("id").take(where).combine_chunks(), pool.column("dataset").take(where).combine_chunks()


def write_selection(ids: list[str], scores, clusters, out: str, meta: dict, pool_table: str) -> None:
    """The selection in rank order, with each row's own id and dataset from ``pool_table`` (pool.parquet)."""
    own_ids, datasets = pool_provenance(pool_table, ids)
    table = pa.table(
        {
            "example_id": ids,
            "id": own_ids,
            "dataset": datasets,
            "rank": np.arange(1, len(ids) + 1, dtype=np.int32),
            "score": pa.array(scores, pa.float32()) if scores is not None else pa.nulls(len(ids), pa.float32()),
            "cluster": pa.array(clusters, pa.int32()) if clusters is not None else pa.nulls(len(ids), pa.int32()),
        },
        schema=selection_schema(),
    )
    write_parquet(table, out, meta)
    log.info(
        "selected %d examples (%s)", len(ids), ", ".join(f"{k}={v}" for k, v in meta.items() if k in ("method", "epoch", "n_gradients"))
    )


def read_scores(path: str) -> tuple[list[str], np.ndarray, dict]:
    table = pq.read_table(path, columns=["example_id", "score"])
    return (
        table.column("example_id").to_pylist(),
        table.column("score").to_numpy(zero_copy_only=False).astype(np.float64),
        read_parquet_metadata(path),
    )


def read_assignments(path: str) -> dict[str, int]:
    table = pq.read_table(path, columns=["example_id", "cluster"])
    return dict(zip(table.column("example_id").to_pylist(), table.column("cluster").to_pylist()))
