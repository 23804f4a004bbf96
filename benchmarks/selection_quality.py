"""Selection quality of every policy and baseline at budgets 10/20/30 %.

    python benchmarks/selection_quality.py                  # synthetic pool with planted clusters
    python benchmarks/selection_quality.py --scores results/grads/warmup/scores.parquet \
        --assignments results/cluster/k-50/assignments.parquet   # a workflow's real scores

Rewards are looked up in known scores (no gradient is computed), so each
method's draws and selection are exactly what it would do at that checkpoint.
Prints mean recall over seeds (Rs: share of the full top-p selected; Rinf:
share of its influence captured) and ends with the line
``clusterucb_rinf_at_20=<x> random_draw_rinf_at_20=<y>``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from clusterucb.selection.bandit import POLICIES
from clusterucb.selection.quality import BudgetedSpec, full_recall, planted_pool, random_subset_recall, simulate

BUDGETS = (0.1, 0.2, 0.3)


def load_real(scores_path: str, assignments_path: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    scores = pq.read_table(scores_path, columns=["example_id", "score"]).to_pandas()
    clusters = pq.read_table(assignments_path, columns=["example_id", "cluster"]).to_pandas()
    frame = scores.merge(clusters, on="example_id", how="left").fillna({"cluster": -1})
    return frame.cluster.to_numpy(dtype=np.int64), frame.score.to_numpy(dtype=np.float64)


def run(labels: np.ndarray, scores: np.ndarray, top_p: float, seeds: list[int]) -> pd.DataFrame:
    rows = []
    for budget in BUDGETS:
        for method, policy in [("clusterucb", p) for p in POLICIES] + [("random_draw", "-")]:
            for seed in seeds:
                spec = BudgetedSpec(method=method, policy=policy if method == "clusterucb" else "random_cluster", budget=budget, seed=seed)
                start = time.perf_counter()
                result = simulate(spec, labels, scores, top_p)
                rows.append(
                    {"method": method, "policy": policy, "budget": budget, "seed": seed, "seconds": time.perf_counter() - start, **result}
                )
        for seed in seeds:
            rows.append(
                {
                    "method": "random",
                    "policy": "-",
                    "budget": budget,
                    "seed": seed,
                    "seconds": 0.0,
                    **random_subset_recall(scores, top_p, seed),
                }
            )
        rows.append(
            {"method": "full (Dynamic/LESS)", "policy": "-", "budget": budget, "seed": 0, "seconds": 0.0, **full_recall(scores, top_p)}
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", help="scores.parquet of a workflow run (default: a synthetic planted pool)")
    parser.add_argument("--assignments", help="assignments.parquet of the same run's k-means")
    parser.add_argument("--top-p", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=5, help="selection seeds averaged")
    parser.add_argument("--pool-seed", type=int, default=0, help="seed of the synthetic pool")
    args = parser.parse_args()
    if args.scores:
        if not args.assignments:
            parser.error("--scores needs --assignments")
        labels, scores = load_real(args.scores, args.assignments)
        source = f"{args.scores} ({len(scores)} samples, {len(set(labels[labels >= 0]))} clusters)"
    else:
        labels, scores = planted_pool(seed=args.pool_seed)
        source = f"synthetic planted pool, seed {args.pool_seed} ({len(scores)} samples, {labels.max() + 1} clusters, 3 hot)"
    frame = run(labels, scores, args.top_p, list(range(args.seeds)))
    table = (
        frame.groupby(["budget", "method", "policy"], sort=False)
        .agg(
            Rs=("Rs", "mean"),
            Rinf=("Rinf", "mean"),
            in_topk_clusters=("budget_in_topk_clusters", "mean"),
            gradients=("n_gradients", "mean"),
            ms=("seconds", "mean"),
        )
        .reset_index()
    )
    table["ms"] *= 1000
    print(f"selection quality on {source}, top_p={args.top_p}, mean over {args.seeds} seeds")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    at_20 = frame[frame.budget == 0.2]
    ucb = at_20[(at_20.method == "clusterucb") & (at_20.policy == "ucb_beta")].Rinf.mean()
    uniform = at_20[at_20.method == "random_draw"].Rinf.mean()
    print(f"clusterucb_rinf_at_20={ucb:.4f} random_draw_rinf_at_20={uniform:.4f}")


if __name__ == "__main__":
    main()
