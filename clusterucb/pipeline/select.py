"""Stages: k-means of the warmup features, and the per-epoch selections (matching, ClusterUCB, random)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from clusterucb.bandit import policy_params
from clusterucb.gradstore import GradientStore
from clusterucb.io import read_parquet_metadata, save_safetensors, write_json, write_parquet
from clusterucb.kmeans import spherical_kmeans
from clusterucb.matching import influence_scores, subtask_scores
from clusterucb.pipeline.data import read_tokens
from clusterucb.pipeline.grads import GradParams, make_featurizer
from clusterucb.pipeline.model import device
from clusterucb.quality import BudgetedSpec, budgeted_selection, expand_grid, full_recall, random_subset_recall, recall_metrics, simulate
from clusterucb.selection import n_selected, random_subset, top_k

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
            pa.field("cluster", pa.int32(), nullable=False),
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("score", pa.float32()),  # NaN: the sample's gradient failed
            pa.field("arm_value", pa.float32()),  # the policy's index of the arm when chosen
        ]
    )


def _write_selection(ids: list[str], scores, clusters, out: str, meta: dict) -> None:
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


def _val_features(tensors: str, index: str, val_tokens: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Validation features in index order, each row's subtask number, and the subtask names."""
    from safetensors.torch import load_file

    table = pq.read_table(index)
    rows = torch.as_tensor(table.column("row").to_numpy(), dtype=torch.long)
    tokens = pq.read_table(val_tokens, columns=["example_id", "subtask"])
    subtask_of = dict(zip(tokens.column("example_id").to_pylist(), tokens.column("subtask").to_pylist()))
    names = sorted(set(subtask_of.values()))
    subtask = torch.as_tensor([names.index(subtask_of[eid]) for eid in table.column("example_id").to_pylist()])
    return load_file(tensors)["features"].float()[rows], subtask, names


def _assignments(path: str) -> dict[str, int]:
    table = pq.read_table(path, columns=["example_id", "cluster"])
    return dict(zip(table.column("example_id").to_pylist(), table.column("cluster").to_pylist()))


def cluster(manifest: str, assignments_out: str, centroids_out: str, k: int, max_iter: int, init: str, backend: str, seed: int) -> None:
    """k-means streamed over the memory-mapped shards of the warmup features."""
    store = GradientStore(manifest)
    parts = store.shard_features()
    ids = [i for part_ids, _ in parts for i in part_ids]
    if store.failures():
        log.warning("%d pool samples have no warmup gradient and are left out of the clusters", len(store.failures()))
    result = spherical_kmeans([features for _, features in parts], k, seed, max_iter=max_iter, init=init, backend=backend, device=device())
    counts = np.bincount(result.labels.numpy(), minlength=k)
    meta = {"k": k, "seed": seed, "init": init, "backend": backend, "n_iter": result.n_iter, "converged": result.converged, "reseeded": result.reseeded, "empty_clusters": int((counts == 0).sum()), "features": store.meta}
    table = pa.table(
        {"example_id": ids, "cluster": pa.array(result.labels.numpy(), pa.int32()), "similarity": pa.array(result.similarity.numpy(), pa.float32())},
        schema=pa.schema([pa.field("example_id", pa.string(), nullable=False), pa.field("cluster", pa.int32(), nullable=False), pa.field("similarity", pa.float32())]),
    )
    write_parquet(table, assignments_out, meta)
    save_safetensors({"centroids": result.centroids, "sizes": torch.as_tensor(counts)}, centroids_out, meta)
    log.info("clusters: K=%d, sizes min/median/max %d/%d/%d, %d empty", k, counts.min(), int(np.median(counts)), counts.max(), int((counts == 0).sum()))


def scores_schema():
    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("score", pa.float32()),  # max over subtasks; NaN for a failed sample
            pa.field("subtask_scores", pa.list_(pa.float32())),  # mean over each subtask's validation examples
        ]
    )


def full_scores(manifest: str, val_tensors: str, val_index: str, val_tokens: str, out: str) -> None:
    """Influence of every pool sample at one checkpoint (spec §4), streamed shard by shard; failed samples as NaN."""
    store = GradientStore(manifest)
    val, subtask, names = _val_features(val_tensors, val_index, val_tokens)
    ids, blocks = [], []
    for part_ids, features in store.shard_features():
        ids += part_ids
        blocks.append(subtask_scores(features, val, subtask).numpy())
    per_subtask = np.concatenate(blocks) if blocks else np.empty((0, len(names)), dtype=np.float32)
    failed = list(store.failures())
    scores = np.concatenate([per_subtask.max(axis=1), np.full(len(failed), np.nan)])
    rows = list(per_subtask) + [np.full(len(names), np.nan)] * len(failed)
    table = pa.table(
        {"example_id": ids + failed, "score": pa.array(scores, pa.float32()), "subtask_scores": pa.array([r.tolist() for r in rows], pa.list_(pa.float32()))},
        schema=scores_schema(),
    )
    write_parquet(table, out, {"checkpoint": store.meta["checkpoint"], "subtasks": names, "n_gradients": len(store.index), "n_failed": len(failed)})
    log.info("full scores at %s: %d samples (%d failed), mean %.4f", store.meta["checkpoint"], len(ids) + len(failed), len(failed), float(np.nanmean(scores)))


def _read_scores(path: str) -> tuple[list[str], np.ndarray, dict]:
    table = pq.read_table(path, columns=["example_id", "score"])
    return table.column("example_id").to_pylist(), table.column("score").to_numpy(zero_copy_only=False).astype(np.float64), read_parquet_metadata(path)


def select_top_scores(scores_path: str, pool_tokens: str, assignments: str, selection_out: str, top_p: float, run: str, epoch: int) -> None:
    """Full matching: the top ``top_p`` of the pool by influence at one checkpoint (Dynamic)."""
    ids, scores, meta = _read_scores(scores_path)
    n_pool = len(read_tokens(pool_tokens))
    order = top_k(scores, n_selected(n_pool, top_p))
    clusters = _assignments(assignments)
    info = {"method": "dynamic", "run": run, "epoch": epoch, "rule": "full_matching", "checkpoint": meta["checkpoint"], "n_pool": n_pool, "n_gradients": meta["n_gradients"], "top_p": top_p}
    _write_selection([ids[i] for i in order], scores[order], [clusters.get(ids[i]) for i in order], selection_out, info)


def select_budgeted(
    model_dir: str,
    checkpoint_dir: str,
    pool_tokens: str,
    val_tensors: str,
    val_index: str,
    val_tokens: str,
    assignments: str,
    selection_out: str,
    draws_out: str,
    grad_params: dict,
    run_params: dict,
    top_p: float,
    run: str,
    epoch: int,
) -> None:
    """ClusterUCB (or random_draw) at the previous epoch's checkpoint: gradients only for the drawn samples (spec §6)."""
    spec = BudgetedSpec(**{k: v for k, v in run_params.items() if k in BudgetedSpec.__dataclass_fields__})
    pool = read_tokens(pool_tokens)
    labels = _assignments(assignments)
    pool_label = np.array([labels.get(row["example_id"], -1) for row in pool], dtype=np.int64)
    if (pool_label < 0).any():
        log.warning("%d pool samples are not in any cluster (no warmup gradient) and cannot be drawn", int((pool_label < 0).sum()))

    featurizer, _ = make_featurizer(model_dir, checkpoint_dir, "adam", GradParams.from_dict(grad_params))
    val, subtask, _ = _val_features(val_tensors, val_index, val_tokens)

    def reward_fn(indices: np.ndarray) -> np.ndarray:
        result = featurizer.featurize([pool[i] for i in indices], desc="draws")
        return influence_scores(result.features, val, subtask).numpy()

    result, selected = budgeted_selection(spec, pool_label, top_p, reward_fn, np.random.default_rng([spec.seed, epoch]))
    draws = result.draws
    position = {int(d.index): n for n, d in enumerate(draws)}
    draw_ids = [pool[d.index]["example_id"] for d in draws]
    draw_scores = np.array([d.score for d in draws])
    draw_clusters = [int(pool_label[d.index]) for d in draws]
    run_meta = {**run_params, "run": run, "epoch": epoch, "checkpoint": str(checkpoint_dir)}
    write_parquet(
        pa.table(
            {
                "draw": pa.array(range(len(draws)), pa.int32()),
                "step": pa.array([d.step for d in draws], pa.int32()),
                "phase": [d.phase for d in draws],
                "cluster": pa.array(draw_clusters, pa.int32()),
                "example_id": draw_ids,
                "score": pa.array(draw_scores, pa.float32()),
                "arm_value": pa.array([d.arm_value for d in draws], pa.float32()),
            },
            schema=draws_schema(),
        ),
        draws_out,
        run_meta,
    )
    order = [position[int(i)] for i in selected]
    meta = {**run_meta, "rule": spec.method if spec.method != "clusterucb" else f"clusterucb/{spec.policy}", "n_pool": len(pool), "n_gradients": len(draws), "n_failed": int((~np.isfinite(draw_scores)).sum()), "top_p": top_p}
    _write_selection([draw_ids[i] for i in order], draw_scores[order], [draw_clusters[i] for i in order], selection_out, meta)


def select_random(pool_tokens: str, selection_out: str, top_p: float, seed: int, run: str, epoch: int) -> None:
    """A uniform random subset of the selection size; the same subset every epoch (the paper's Random baseline)."""
    pool = read_tokens(pool_tokens)
    chosen = random_subset(len(pool), n_selected(len(pool), top_p), seed)
    meta = {"method": "random", "run": run, "epoch": epoch, "rule": "random", "n_pool": len(pool), "n_gradients": 0, "top_p": top_p, "seed": seed}
    _write_selection([pool[i]["example_id"] for i in chosen], None, None, selection_out, meta)


def less_weights(train_log: str) -> np.ndarray:
    """LESS checkpoint weights: each warmup epoch's mean learning rate, normalised to sum to 1 (spec §4)."""
    frame = pq.read_table(train_log).to_pandas()
    means = frame.groupby("epoch").lr.mean().sort_index().to_numpy()
    if (means <= 0).all():
        raise ValueError(f"{train_log}: every LESS warmup epoch has a zero learning rate")
    return means / means.sum()


def select_less(scores_paths: list[str], train_log: str, pool_tokens: str, selection_out: str, top_p: float, run: str, epoch: int) -> None:
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
    n_pool = len(read_tokens(pool_tokens))
    order = top_k(scores, n_selected(n_pool, top_p))
    # A static selection: its gradients are counted once, at epoch 1; later epochs reuse it.
    meta = {"method": "less", "run": run, "epoch": epoch, "rule": "less", "checkpoints": len(weights), "weights": weights.tolist(), "n_pool": n_pool, "n_gradients": n_gradients if epoch == 1 else 0, "top_p": top_p}
    _write_selection([ids[i] for i in order], scores[order], None, selection_out, meta)


def recall(selection: str, draws: str, scores_path: str, assignments: str, recall_out: str, arms_out: str, top_p: float) -> None:
    """Oracle: recall of a budgeted selection against the full top-p at the same checkpoint, and per-cluster pulls."""
    ids, scores, meta = _read_scores(scores_path)
    position = {eid: i for i, eid in enumerate(ids)}
    selected_ids = pq.read_table(selection, columns=["example_id"]).column("example_id").to_pylist()
    drawn = pq.read_table(draws).to_pandas()
    k = n_selected(len(ids), top_p)
    metrics = recall_metrics(
        np.array([position[e] for e in selected_ids]), np.array([position[e] for e in drawn.example_id]), scores, k
    )
    labels = _assignments(assignments)
    truth = set(top_k(scores, k).tolist())
    frame = pd.DataFrame({"cluster": [labels.get(e, -1) for e in ids], "score": scores, "in_top_k": [i in truth for i in range(len(ids))]})
    arms = frame[frame.cluster >= 0].groupby("cluster").agg(size=("score", "size"), oracle_mean=("score", "mean"), oracle_std=("score", "std"), top_k_members=("in_top_k", "sum"))
    arms["pulls"] = drawn.groupby("cluster").size().reindex(arms.index, fill_value=0)
    arms["reward_mean"] = drawn.groupby("cluster").score.mean().reindex(arms.index)
    arms = arms.reset_index()
    write_parquet(pa.Table.from_pandas(arms, preserve_index=False), arms_out, {"checkpoint": meta["checkpoint"]})
    selection_meta = read_parquet_metadata(selection)
    result = {**metrics, "k": k, "n_drawn": len(drawn), "checkpoint": meta["checkpoint"], "run": selection_meta.get("run"), "epoch": selection_meta.get("epoch")}
    write_json(result, recall_out)
    log.info("recall of %s epoch %s: Rs %.3f, Rinf %.3f (drawn set: Rs %.3f, Rinf %.3f)", result["run"], result["epoch"], metrics["Rs"], metrics["Rinf"], metrics["Rs_drawn"], metrics["Rinf_drawn"])


def quality_sweep(scores_path: str, assignment_paths: list[str], grid: dict, top_p: float, seed: int, out: str) -> None:
    """Replay every grid point on the full-pool scores of one checkpoint; recall and cost per point."""
    ids, scores, meta = _read_scores(scores_path)
    labels_by_k = {}
    for path in assignment_paths:
        k = int(read_parquet_metadata(path)["k"])
        mapping = _assignments(path)
        labels_by_k[k] = np.array([mapping.get(e, -1) for e in ids], dtype=np.int64)
    rows = []
    for spec, k in expand_grid(grid, sorted(labels_by_k)):
        result = simulate(spec, labels_by_k[k], scores, top_p)
        clustered = spec.method == "clusterucb"
        rows.append(
            {
                "method": spec.method,
                "policy": spec.policy if clustered else None,
                "budget": spec.budget,
                "csp": spec.csp if clustered else None,
                "beta": spec.beta if clustered and "beta" in policy_params(spec.policy) else None,
                "ucb_p": spec.ucb_p if clustered and "ucb_p" in policy_params(spec.policy) else None,
                "k": k if clustered else None,
                "seed": spec.seed,
                **result,
            }
        )
    for s in sorted(set(grid.get("seed") or [seed])):
        rows.append({"method": "random", "seed": s, **random_subset_recall(scores, top_p, s)})
    rows.append({"method": "full", "seed": None, **full_recall(scores, top_p)})
    frame = pd.DataFrame(rows)
    frame.insert(0, "checkpoint", meta["checkpoint"])
    write_parquet(pa.Table.from_pandas(frame, preserve_index=False), out, {"checkpoint": meta["checkpoint"], "top_p": top_p, "grid": grid})
    log.info("quality sweep at %s: %d grid points", meta["checkpoint"], len(rows))
