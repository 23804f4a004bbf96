"""Stages: k-means of the warmup features, and the per-epoch selections (matching, ClusterUCB, random)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from clusterucb.bandit import make_policy
from clusterucb.gradstore import GradientStore
from clusterucb.io import save_safetensors, write_parquet
from clusterucb.kmeans import spherical_kmeans
from clusterucb.matching import influence_scores
from clusterucb.pipeline.data import read_tokens
from clusterucb.pipeline.grads import GradParams, make_featurizer
from clusterucb.selection import ClusterUCB, clusters_from_labels, n_selected, plan_budget, random_subset, top_k

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


def _val_features(tensors: str, index: str, val_tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation features in index order and each row's subtask number (for the max over subtasks)."""
    from safetensors.torch import load_file

    table = pq.read_table(index)
    rows = torch.as_tensor(table.column("row").to_numpy(), dtype=torch.long)
    tokens = pq.read_table(val_tokens, columns=["example_id", "subtask"])
    subtask_of = dict(zip(tokens.column("example_id").to_pylist(), tokens.column("subtask").to_pylist()))
    names = sorted(set(subtask_of.values()))
    subtask = torch.as_tensor([names.index(subtask_of[eid]) for eid in table.column("example_id").to_pylist()])
    return load_file(tensors)["features"].float()[rows], subtask


def _assignments(path: str) -> dict[str, int]:
    table = pq.read_table(path, columns=["example_id", "cluster"])
    return dict(zip(table.column("example_id").to_pylist(), table.column("cluster").to_pylist()))


def cluster(manifest: str, assignments_out: str, centroids_out: str, k: int, max_iter: int, init: str, backend: str, seed: int) -> None:
    store = GradientStore(manifest)
    ids, features = store.load()
    if store.failures():
        log.warning("%d pool samples have no warmup gradient and are left out of the clusters", len(store.failures()))
    result = spherical_kmeans(features, k, seed, max_iter=max_iter, init=init, backend=backend)
    counts = np.bincount(result.labels.numpy(), minlength=k)
    meta = {"k": k, "seed": seed, "init": init, "backend": backend, "n_iter": result.n_iter, "converged": result.converged, "reseeded": result.reseeded, "empty_clusters": int((counts == 0).sum()), "features": store.meta}
    table = pa.table(
        {"example_id": ids, "cluster": pa.array(result.labels.numpy(), pa.int32()), "similarity": pa.array(result.similarity.numpy(), pa.float32())}
    )
    write_parquet(table, assignments_out, meta)
    save_safetensors({"centroids": result.centroids, "sizes": torch.as_tensor(counts)}, centroids_out, meta)
    log.info("clusters: K=%d, sizes min/median/max %d/%d/%d, %d empty", k, counts.min(), int(np.median(counts)), counts.max(), int((counts == 0).sum()))


def select_matching(manifest: str, val_tensors: str, val_index: str, val_tokens: str, assignments: str, pool_tokens: str, selection_out: str, scores_out: str, top_p: float, method: str, epoch: int) -> None:
    """Full matching: every pool sample's influence at the warmup checkpoint, top ``top_p`` (Dynamic's epoch 1)."""
    store = GradientStore(manifest)
    ids, features = store.load()
    val, subtask = _val_features(val_tensors, val_index, val_tokens)
    scores = influence_scores(features, val, subtask).numpy()
    n_pool = len(read_tokens(pool_tokens))
    order = top_k(scores, n_selected(n_pool, top_p))
    clusters = _assignments(assignments)
    write_parquet(pa.table({"example_id": ids, "score": pa.array(scores, pa.float32())}), scores_out, {"checkpoint": "warmup"})
    meta = {"method": method, "epoch": epoch, "rule": "full_matching", "checkpoint": store.meta["checkpoint"], "n_pool": n_pool, "n_gradients": len(store.index), "top_p": top_p}
    _write_selection([ids[i] for i in order], scores[order], [clusters.get(ids[i]) for i in order], selection_out, meta)


def select_clusterucb(
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
    top_p: float,
    budget: float,
    csp: float,
    policy: str,
    beta: float,
    draw_batch: int,
    seed: int,
    method: str,
    epoch: int,
) -> None:
    """ClusterUCB at the previous epoch's checkpoint: gradients only for the samples the bandit draws (spec §6)."""
    pool = read_tokens(pool_tokens)
    labels = _assignments(assignments)
    pool_label = np.array([labels.get(row["example_id"], -1) for row in pool], dtype=np.int64)
    if (pool_label < 0).any():
        log.warning("%d pool samples are not in any cluster (no warmup gradient) and cannot be drawn", int((pool_label < 0).sum()))
    members, cluster_ids = clusters_from_labels(pool_label)

    featurizer, _ = make_featurizer(model_dir, checkpoint_dir, "adam", GradParams.from_dict(grad_params))
    val, subtask = _val_features(val_tensors, val_index, val_tokens)

    def reward_fn(indices: np.ndarray) -> np.ndarray:
        result = featurizer.featurize([pool[i] for i in indices], desc="draws")
        return influence_scores(result.features, val, subtask).numpy()

    rng = np.random.default_rng([seed, epoch])
    bandit = ClusterUCB(members, make_policy(policy, {"beta": beta}, rng), reward_fn, rng, draw_batch)
    plan = plan_budget([len(m) for m in members], len(pool), budget, csp)
    log.info("budget: %d cold-start + %d UCB draws over %d clusters (pool %d)", sum(plan.cold_start.values()), plan.horizon, len(members), len(pool))
    result = bandit.run(plan)

    draws = result.draws
    draw_ids = [pool[d.index]["example_id"] for d in draws]
    draw_scores = np.array([d.score for d in draws])
    draw_clusters = [cluster_ids[d.cluster] for d in draws]
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
        {"policy": policy, "beta": beta, "budget": budget, "csp": csp, "draw_batch": draw_batch, "seed": seed, "epoch": epoch, "checkpoint": str(checkpoint_dir)},
    )
    order = top_k(draw_scores, n_selected(len(pool), top_p))
    meta = {
        "method": method,
        "epoch": epoch,
        "rule": f"clusterucb/{policy}",
        "checkpoint": str(checkpoint_dir),
        "n_pool": len(pool),
        "n_gradients": len(draws),
        "n_failed": int((~np.isfinite(draw_scores)).sum()),
        "top_p": top_p,
        "budget": budget,
        "csp": csp,
        "beta": beta,
    }
    _write_selection([draw_ids[i] for i in order], draw_scores[order], [draw_clusters[i] for i in order], selection_out, meta)


def select_random(pool_tokens: str, selection_out: str, top_p: float, seed: int, method: str, epoch: int) -> None:
    """A uniform random subset of the selection size; the same subset every epoch (the paper's Random baseline)."""
    pool = read_tokens(pool_tokens)
    chosen = random_subset(len(pool), n_selected(len(pool), top_p), seed)
    meta = {"method": method, "epoch": epoch, "rule": "random", "n_pool": len(pool), "n_gradients": 0, "top_p": top_p, "seed": seed}
    _write_selection([pool[i]["example_id"] for i in chosen], None, None, selection_out, meta)

