"""Stages: the selections that need no gradient of their own: full matching on existing scores (Dynamic),
LESS's LR-weighted matching, and a random subset."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq

from clusterucb.infra.io import read_parquet_metadata
from clusterucb.pipeline.data import pool_ids, pool_size
from clusterucb.pipeline.tables import read_scores, write_selection
from clusterucb.selection.select import n_selected, random_subset, top_k
from clusterucb.training.schedule import learning_rates, mean_lr_per_epoch

log = logging.getLogger(__name__)


def select_top_scores(
    *, scores_path: str, pool_tokens: str, pool_table: str, selection_out: str, top_p: float, task: str, run: str, epoch: int
) -> None:
    """Full matching: the top ``top_p`` of the pool by influence at one checkpoint (epoch 1 of the Dynamic
    family, every epoch of Dynamic). Clusters are not read: they do not change the selection, so ``cluster.k``
    must not rerun it (the report joins the assignments where it needs them)."""
    ids, scores, meta = read_scores(scores_path)
    n_pool = pool_size(pool_tokens)
    order = top_k(scores, n_selected(n_pool, top_p))
    method = "full_matching" if epoch == 1 else "dynamic"  # Dynamic's epoch 1 is always a shared full matching
    info = {
        "method": method,
        "task": task,
        "run": run,
        "epoch": epoch,
        "rule": "full_matching",
        "checkpoint": meta["checkpoint"],
        "n_pool": n_pool,
        "n_gradients": meta["n_gradients"],
        "top_p": top_p,
    }
    write_selection([ids[i] for i in order], scores[order], None, selection_out, info, pool_table)


def select_static(*, epoch1_selection: str, pool_table: str, selection_out: str, task: str, run: str, epoch: int) -> None:
    """Static: epoch 1's full-matching selection again at a later epoch (what keeping it costs: no gradient)."""
    table = pq.read_table(epoch1_selection, columns=["example_id", "score"])
    first = read_parquet_metadata(epoch1_selection)
    meta = {
        "method": "static",
        "task": task,
        "run": run,
        "epoch": epoch,
        "rule": "static",
        "checkpoint": first["checkpoint"],
        "n_pool": first["n_pool"],
        "n_gradients": 0,
        "top_p": first["top_p"],
    }
    scores = table.column("score").to_numpy(zero_copy_only=False)
    write_selection(table.column("example_id").to_pylist(), scores, None, selection_out, meta, pool_table)


def select_random(
    *, pool_tokens: str, pool_table: str, selection_out: str, top_p: float, seed: int, task: str, run: str, epoch: int
) -> None:
    """A uniform random subset of the selection size; the same subset every epoch (the paper's Random baseline)."""
    ids = pool_ids(pool_tokens)
    chosen = random_subset(len(ids), n_selected(len(ids), top_p), seed)
    meta = {
        "method": "random",
        "task": task,
        "run": run,
        "epoch": epoch,
        "rule": "random",
        "n_pool": len(ids),
        "n_gradients": 0,
        "top_p": top_p,
        "seed": seed,
    }
    write_selection([ids[i] for i in chosen], None, None, selection_out, meta, pool_table)


def less_weights(train_log: str) -> np.ndarray:
    """LESS checkpoint weights: each warmup epoch's mean learning rate, normalised to sum to 1 (spec §4),
    computed from the warmup's LR schedule (recorded in the log's metadata) rather than from its rows."""
    meta = read_parquet_metadata(train_log)
    if "schedule" not in meta:
        raise ValueError(f"{train_log}: no LR schedule in its metadata (written by an older version): rerun it with --forcerun less_warmup")
    schedule = meta["schedule"]
    means = mean_lr_per_epoch(float(schedule["lr"]), int(schedule["steps_per_epoch"]), int(meta["epochs"]), float(schedule["warmup_ratio"]))
    if (means <= 0).all():
        raise ValueError(f"{train_log}: every LESS warmup epoch has a zero learning rate")
    # The rows the log has must follow that schedule (a log may miss rows; it may not contradict it).
    logged = pq.read_table(train_log, columns=["global_step", "lr"]).to_pandas()
    expected = learning_rates(
        float(schedule["lr"]), int(schedule["steps_per_epoch"]) * int(meta["epochs"]), float(schedule["warmup_ratio"])
    )
    if len(logged) and not np.allclose(logged.lr.to_numpy(), expected[logged.global_step.to_numpy() - 1], rtol=1e-9, atol=0):
        raise ValueError(f"{train_log}: the logged learning rates differ from the schedule in its metadata {schedule}")
    return means / means.sum()


def select_less(
    *,
    scores_paths: list[str],
    train_log: str,
    pool_tokens: str,
    pool_table: str,
    selection_out: str,
    top_p: float,
    task: str,
    run: str,
    epoch: int,
) -> None:
    """LESS: max over subtasks of the LR-weighted sum over warmup checkpoints of the mean inner products."""
    weights = less_weights(train_log)
    if len(weights) != len(scores_paths):
        raise ValueError(f"{len(scores_paths)} LESS checkpoints but {len(weights)} epochs in {train_log}")
    combined, ids, n_gradients = None, None, 0
    for weight, path in zip(weights, scores_paths):
        table = pq.read_table(path).to_pandas().set_index("example_id")
        if ids is None:
            ids = table.index.tolist()
        table = table.loc[ids]
        per_subtask = np.stack([np.asarray(v, dtype=np.float64) for v in table.subtask_scores])
        combined = weight * per_subtask if combined is None else combined + weight * per_subtask
        n_gradients += int(read_parquet_metadata(path)["n_gradients"])
    scores = combined.max(axis=1)
    n_pool = pool_size(pool_tokens)
    order = top_k(scores, n_selected(n_pool, top_p))
    # A static selection: its gradients are counted once, at epoch 1; later epochs reuse it.
    meta = {
        "method": "less",
        "task": task,
        "run": run,
        "epoch": epoch,
        "rule": "less",
        "checkpoints": len(weights),
        "weights": weights.tolist(),
        "n_pool": n_pool,
        "n_gradients": n_gradients if epoch == 1 else 0,
        "top_p": top_p,
    }
    write_selection([ids[i] for i in order], scores[order], None, selection_out, meta, pool_table)
