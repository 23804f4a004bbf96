"""Stage: influence of every pool sample at a checkpoint for one target task (full matching, spec §4)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from clusterucb.data.tokens import TokenTable, token_meta
from clusterucb.features.gradstore import GradientStore
from clusterucb.features.matching import subtask_scores
from clusterucb.infra.io import write_parquet
from clusterucb.infra.logsetup import progress
from clusterucb.pipeline.tables import scores_schema

log = logging.getLogger(__name__)


def val_features(tensors: str, index: str, val_tokens: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Validation features in index order, each row's subtask number, and the subtask names."""
    from safetensors.torch import load_file

    table = pq.read_table(index)
    rows = torch.as_tensor(table.column("row").to_numpy(), dtype=torch.long)
    tokens = TokenTable.open(val_tokens)
    subtask_of = dict(zip(tokens.ids(), tokens.column("subtask")))
    names = sorted(set(subtask_of.values()))
    subtask = torch.as_tensor([names.index(subtask_of[eid]) for eid in table.column("example_id").to_pylist()])
    return load_file(tensors)["features"].float()[rows], subtask, names


def full_scores(*, manifest: str, val_tensors: str, val_index: str, val_tokens: str, out: str) -> None:
    """Influence of every pool sample at one checkpoint (spec §4), streamed shard by shard; failed samples as NaN."""
    store = GradientStore(manifest)
    val, subtask, names = val_features(val_tensors, val_index, val_tokens)
    ids, blocks = [], []
    for part_ids, features in progress(store.iter_shard_features(), desc="shards", total=len(store.shards)):
        ids += part_ids
        blocks.append(subtask_scores(features, val, subtask).numpy())
        del features  # unmapped: the pages read leave this job's resident set
    per_subtask = np.concatenate(blocks) if blocks else np.empty((0, len(names)), dtype=np.float32)
    failed = list(store.failures())
    scores = np.concatenate([per_subtask.max(axis=1), np.full(len(failed), np.nan)])
    rows = list(per_subtask) + [np.full(len(names), np.nan)] * len(failed)
    table = pa.table(
        {
            "example_id": ids + failed,
            "score": pa.array(scores, pa.float32()),
            "subtask_scores": pa.array([r.tolist() for r in rows], pa.list_(pa.float32())),
        },
        schema=scores_schema(),
    )
    task = token_meta(val_tokens).get("task")
    write_parquet(
        table,
        out,
        {"checkpoint": store.meta["checkpoint"], "task": task, "subtasks": names, "n_gradients": len(store.index), "n_failed": len(failed)},
    )
    log.info(
        "full scores at %s: %d samples (%d failed), mean %.4f",
        store.meta["checkpoint"],
        len(ids) + len(failed),
        len(failed),
        float(np.nanmean(scores)),
    )
