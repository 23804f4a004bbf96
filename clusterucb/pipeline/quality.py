"""Stages: the oracle's recall of a budgeted selection, and the selection-quality sweep replayed on full-pool scores."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clusterucb.features.gradstore import GradientStore
from clusterucb.infra.io import read_parquet_metadata, write_json, write_parquet
from clusterucb.infra.logsetup import progress
from clusterucb.pipeline.tables import read_assignments, read_scores
from clusterucb.selection.bandit import policy_params
from clusterucb.selection.quality import (
    cluster_concentration,
    expand_grid,
    full_recall,
    random_subset_recall,
    recall_metrics,
    simulate,
    static_recall,
)
from clusterucb.selection.runs import PRIOR_METHODS
from clusterucb.selection.select import n_selected, top_k

log = logging.getLogger(__name__)


def recall(*, selection: str, draws: str, scores_path: str, assignments: str, recall_out: str, arms_out: str, top_p: float) -> None:
    """Oracle: recall of a budgeted selection against the full top-p at the same checkpoint, and per-cluster pulls."""
    ids, scores, meta = read_scores(scores_path)
    position = {eid: i for i, eid in enumerate(ids)}
    selected_ids = pq.read_table(selection, columns=["example_id"]).column("example_id").to_pylist()
    drawn = pq.read_table(draws).to_pandas()
    k = n_selected(len(ids), top_p)
    labels = read_assignments(assignments)
    pool_labels = np.array([labels.get(e, -1) for e in ids], dtype=np.int64)
    metrics = recall_metrics(
        np.array([position[e] for e in selected_ids]), np.array([position[e] for e in drawn.example_id]), scores, k, pool_labels
    )
    truth = set(top_k(scores, k).tolist())
    frame = pd.DataFrame({"cluster": pool_labels, "score": scores, "in_top_k": [i in truth for i in range(len(ids))]})
    arms = (
        frame[frame.cluster >= 0]
        .groupby("cluster")
        .agg(size=("score", "size"), oracle_mean=("score", "mean"), oracle_std=("score", "std"), top_k_members=("in_top_k", "sum"))
    )
    # The clusters the draws fell in, from the assignments (random_draw's draws do not carry them).
    drawn_cluster = drawn.example_id.map(labels).fillna(-1).astype(int)
    arms["pulls"] = drawn.groupby(drawn_cluster).size().reindex(arms.index, fill_value=0)
    arms["reward_mean"] = drawn.groupby(drawn_cluster).score.mean().reindex(arms.index)
    arms = arms.reset_index()
    write_parquet(pa.Table.from_pandas(arms, preserve_index=False), arms_out, {"checkpoint": meta["checkpoint"]})
    selection_meta = read_parquet_metadata(selection)
    result = {
        **metrics,
        "k": k,
        "n_drawn": len(drawn),
        "checkpoint": meta["checkpoint"],
        "task": selection_meta.get("task"),
        "run": selection_meta.get("run"),
        "epoch": selection_meta.get("epoch"),
    }
    write_json(result, recall_out)
    log.info(
        "recall of %s epoch %s: Rs %.3f, Rinf_excess %.3f, budget in top-k clusters %.3f",
        result["run"],
        result["epoch"],
        metrics["Rs"],
        metrics["Rinf_excess"],
        metrics["budget_in_topk_clusters"],
    )


def warmup_features(manifest: str, ids: list[str]) -> np.ndarray:
    """The warmup store's features in the order of ``ids`` (float32); a sample without one (its warmup gradient
    failed, so it is in no cluster and never drawn) gets zeros."""
    store_ids, features = GradientStore(manifest, verify=False).load()
    position = {e: i for i, e in enumerate(store_ids)}
    out = np.zeros((len(ids), features.shape[1]), dtype=np.float32)
    found = [(n, position[e]) for n, e in enumerate(ids) if e in position]
    if found:
        rows, source = map(list, zip(*found))
        out[rows] = features[source].float().numpy()
    return out


def aligned_scores(path: str, ids: list[str]) -> np.ndarray:
    """The scores of ``path`` in the order of ``ids`` (NaN for an id it lacks, e.g. a failed warmup gradient)."""
    other_ids, other, _ = read_scores(path)
    position = {e: i for i, e in enumerate(other_ids)}
    return np.array([other[position[e]] if e in position else np.nan for e in ids])


def quality_sweep(
    *,
    scores_path: str,
    assignment_paths: list[str],
    grid: dict,
    top_p: float,
    seed: int,
    out: str,
    clusters_out: str,
    prior_path: str | None = None,
    static_path: str | None = None,
    warmup_manifest: str | None = None,
) -> None:
    """Replay every grid point on the full-pool scores of one checkpoint; recall and cost per point.

    ``prior_path``: the prior scores at this checkpoint (warmup features against its validation gradients), read
    by prior_rerank and ClusterUCB's prior guidance. ``static_path``: the warmup checkpoint's scores, whose top-k
    is epoch 1's full-matching selection: the static method, kept every epoch, is recalled against this checkpoint.
    ``warmup_manifest``: the warmup gradient store, whose features prior_knn reads (who is whose neighbour).
    Also, per clustering (K): its size distribution and how much of the scores'
    variance it explains (eta2) against random groupings of the same sizes.
    """
    ids, scores, meta = read_scores(scores_path)
    prior = None if prior_path is None else np.nan_to_num(aligned_scores(prior_path, ids), nan=-np.inf)
    labels_by_k = {}
    for path in assignment_paths:
        k = int(read_parquet_metadata(path)["k"])
        mapping = read_assignments(path)
        labels_by_k[k] = np.array([mapping.get(e, -1) for e in ids], dtype=np.int64)
    concentration = [{"k": k, **cluster_concentration(labels, scores, top_p, seed=seed)} for k, labels in sorted(labels_by_k.items())]
    for row in concentration:
        log.info(
            "K=%d: sizes %d/%.0f/%d (min/median/max), eta2 %.3f vs %.3f +- %.3f for random groupings",
            row["k"],
            row["size_min"],
            row["size_median"],
            row["size_max"],
            row["eta2"],
            row["eta2_random_mean"],
            row["eta2_random_std"],
        )
    clusters = pd.DataFrame(concentration)
    clusters.insert(0, "checkpoint", meta["checkpoint"])
    clusters.insert(0, "task", meta.get("task"))
    write_parquet(pa.Table.from_pandas(clusters, preserve_index=False), clusters_out, {"checkpoint": meta["checkpoint"], "top_p": top_p})
    rows = []
    points = list(expand_grid(grid, sorted(labels_by_k)))
    features = None
    if any(spec.needs_features for spec, _ in points):
        if warmup_manifest is None:
            raise ValueError("the grid replays prior_knn: it needs the warmup gradient store")
        features = warmup_features(warmup_manifest, ids)
    for spec, k in progress(points, desc="replays"):
        result = simulate(
            spec,
            labels_by_k[k],
            scores,
            top_p,
            prior=prior if spec.needs_prior else None,
            features=features if spec.needs_features else None,
        )
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
                "seed": spec.seed if spec.method not in PRIOR_METHODS else None,
                "order": spec.order if clustered else None,
                "arm_prior": spec.arm_prior if clustered else None,
                "exhaust": spec.exhaust if clustered else None,
                **result,
            }
        )
    for s in sorted(set(grid.get("seed") or [seed])):
        rows.append({"method": "random", "seed": s, **random_subset_recall(scores, top_p, s)})
    rows.append({"method": "full", "seed": None, **full_recall(scores, top_p)})
    if static_path is not None:
        rows.append(
            {"method": "static", "seed": None, **static_recall(np.nan_to_num(aligned_scores(static_path, ids), nan=-np.inf), scores, top_p)}
        )
    frame = pd.DataFrame(rows)
    frame.insert(0, "checkpoint", meta["checkpoint"])
    frame.insert(0, "task", meta.get("task"))
    write_parquet(pa.Table.from_pandas(frame, preserve_index=False), out, {"checkpoint": meta["checkpoint"], "top_p": top_p, "grid": grid})
    log.info("quality sweep at %s: %d grid points", meta["checkpoint"], len(rows))
