"""Which clustering makes ClusterUCB work: k-means variants measured on the quality sweep of a finished run.

    python benchmarks/cluster_variants.py --run-dir . --ks 12,25,50,100
    python benchmarks/cluster_variants.py --run-dir . --checkpoints warmup,runs/full_matching/epoch-1
    python benchmarks/cluster_variants.py --run-dir . --tasks gsm8k --checkpoints runs/full_matching/epoch-1 \
        --features runs/gsm8k/full_matching/epoch-1     # clusters of the epoch-1 features (re-clustering's upper bound)

Reads the warmup pool features of a run (results/grads/warmup/pool/) and the
full-pool scores of every target task at each checkpoint, then for every
clustering variant and K: cluster sizes, the share of the scores' variance the
clusters explain (eta2) against random groupings of the same sizes, and the
recall of ClusterUCB (ucb_beta) and of uniform draws (random_draw) at budgets
10/20/30 %, replayed on the scores (no gradient computed), mean over seeds.

First it prints a diagnosis of the features: the norm of the mean unit feature
(1 = every sample points the same way, 0 = no shared direction), the share of
the variance in the top principal directions, and how strongly the scores
follow the shared direction.

Ends with ``best=<variant>/K=<k> rs_at_20=<mean over tasks> random_draw_rs_at_20=<...>
eta2=<...> eta2_random=<...>`` for the variant with the highest mean Rs at 20 %.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from clusterucb.features.gradstore import GradientStore
from clusterucb.infra import paths
from clusterucb.selection.kmeans import spherical_kmeans
from clusterucb.selection.quality import BudgetedSpec, cluster_concentration, simulate

# name -> spherical_kmeans options; "official" is the paper's code path (our fixes to k-means itself included).
VARIANTS = {
    "official": {},
    "restarts5": {"restarts": 5},
    "center": {"center": True},
    "center+pc1": {"center": True, "remove_components": 1},
    "center+pc4": {"center": True, "remove_components": 4},
    "center+pc16": {"center": True, "remove_components": 16},
    "center+restarts5": {"center": True, "restarts": 5},
}
BUDGETS = (0.1, 0.2, 0.3)


def diagnose(x: torch.Tensor, scores: dict[str, np.ndarray]) -> None:
    """The shared direction of the unit features and how much the scores follow it."""
    unit = F.normalize(x.float(), dim=1)
    mean = unit.mean(0)
    direction = F.normalize(mean, dim=0)
    along = unit @ direction
    singular = torch.linalg.svdvals(unit - mean)
    energy = singular**2 / (singular**2).sum()
    raw = torch.linalg.svdvals(unit)
    print(f"features: N={len(x)}, d={x.shape[1]}; norm of the mean unit feature {float(mean.norm()):.3f}")
    print(f"  cosine to the mean direction: mean {float(along.mean()):.3f}, std {float(along.std()):.3f}, min {float(along.min()):.3f}")
    print(f"  uncentred top singular values^2 share: {', '.join(f'{float(v):.3f}' for v in (raw[:5] ** 2 / (raw**2).sum()))}")
    print(
        f"  centred variance share of the top 1/4/16 components: {float(energy[:1].sum()):.3f} / {float(energy[:4].sum()):.3f} / {float(energy[:16].sum()):.3f}"
    )
    for task, s in scores.items():
        finite = np.isfinite(s)
        corr = np.corrcoef(along.numpy()[finite], s[finite])[0, 1]
        print(
            f"  {task}: share of negative scores {float((s[finite] < 0).mean()):.2f}, corr(score, cosine to the mean direction) {corr:+.3f}"
        )


def load_scores(run_dir: Path, ckpt: str, task: str, ids: list[str]) -> np.ndarray:
    table = pq.read_table(
        run_dir / paths.SCORES.format(ckpt=paths.task_checkpoint(task, ckpt), task=task), columns=["example_id", "score"]
    ).to_pandas()
    return table.set_index("example_id").score.reindex(ids).to_numpy(dtype=np.float64)


def measure(x: torch.Tensor, scores: dict, variant: str, k: int, kseed: int, args) -> list[dict]:
    """One clustering (variant, K, k-means seed): per task and checkpoint, concentration and replayed recall."""
    start = time.perf_counter()
    labels = spherical_kmeans(x, k, kseed, **VARIANTS[variant]).labels.numpy()
    seconds = time.perf_counter() - start
    rows = []
    for (task, ckpt), s in scores.items():
        row = {"variant": variant, "k": k, "kmeans_seed": kseed, "task": task, "checkpoint": ckpt, "kmeans_s": seconds}
        row.update(cluster_concentration(labels, s, args.top_p, seed=args.seed))
        for budget in BUDGETS:
            for method, tag in (("clusterucb", "ucb"), ("random_draw", "rd")):
                results = [
                    simulate(BudgetedSpec(method=method, budget=budget, seed=seed), labels, s, args.top_p) for seed in range(args.seeds)
                ]
                row[f"{tag}_Rs@{budget}"] = float(np.mean([r["Rs"] for r in results]))
                row[f"{tag}_Rs@{budget}_std"] = float(np.std([r["Rs"] for r in results]))
                row[f"{tag}_Rx@{budget}"] = float(np.mean([r["Rinf_excess"] for r in results]))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("."), help="a finished run's working directory (holds results/)")
    parser.add_argument("--tasks", default="gsm8k,mmlu,bbh,tydiqa,humaneval", help="target tasks whose scores exist in the run")
    parser.add_argument(
        "--checkpoints", default="warmup", help="comma-separated quality checkpoints (warmup, runs/full_matching/epoch-1, ...)"
    )
    parser.add_argument("--ks", default="12,25,50,100")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--top-p", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=42, help="k-means seed (the run's master seed)")
    parser.add_argument(
        "--kmeans-seeds", type=int, default=1, help="k-means runs from seed, seed+1, ... averaged (a variant's luck of the draw)"
    )
    parser.add_argument(
        "--features",
        default="warmup",
        help="checkpoint whose full-pool features are clustered (default: warmup, as the method; a later one "
        "bounds what re-clustering at that checkpoint could gain)",
    )
    parser.add_argument("--out", type=Path, help="also write the per-point table here (parquet)")
    args = parser.parse_args()

    store = GradientStore(args.run_dir / paths.POOL_MANIFEST.format(ckpt=args.features))
    ids, x = store.load()
    tasks = [t for t in args.tasks.split(",") if t]
    checkpoints = [c for c in args.checkpoints.split(",") if c]
    scores = {(task, ckpt): load_scores(args.run_dir, ckpt, task, ids) for task in tasks for ckpt in checkpoints}
    diagnose(x, {f"{t} at {c}": s for (t, c), s in scores.items()})

    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        for k in [int(v) for v in args.ks.split(",")]:
            part = []
            for kseed in range(args.seed, args.seed + args.kmeans_seeds):
                part += measure(x, scores, variant, k, kseed, args)
            rows += part
            part = pd.DataFrame(part)
            print(
                f"{variant:16s} K={k:4d} ({part.kmeans_s.mean():5.1f} s): sizes {part.size_min.mean():.0f}/{part.size_median.mean():.0f}/{part.size_max.mean():.0f}, "
                f"eta2 {part.eta2.mean():.3f} vs {part.eta2_random_mean.mean():.3f} random; "
                f"Rs@20 ucb {part['ucb_Rs@0.2'].mean():.3f} vs random_draw {part['rd_Rs@0.2'].mean():.3f}",
                flush=True,
            )
    frame = pd.DataFrame(rows)
    if args.out:
        frame.to_parquet(args.out)
    columns = ["variant", "k", "kmeans_seed", "task", "checkpoint", "size_min", "size_median", "size_max", "eta2", "eta2_random_mean"]
    columns += [f"{tag}_Rs@{b}" for b in BUDGETS for tag in ("ucb", "rd")]
    with pd.option_context("display.width", 250, "display.max_rows", 1000):
        print(frame[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    summary = frame.groupby(["variant", "k"]).agg(
        ucb=("ucb_Rs@0.2", "mean"), rd=("rd_Rs@0.2", "mean"), eta2=("eta2", "mean"), eta2_random=("eta2_random_mean", "mean")
    )
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    (variant, k), best = summary.ucb.idxmax(), summary.loc[summary.ucb.idxmax()]
    print(
        f"best={variant}/K={k} rs_at_20={best.ucb:.4f} random_draw_rs_at_20={best.rd:.4f} eta2={best.eta2:.4f} eta2_random={best.eta2_random:.4f}"
    )


if __name__ == "__main__":
    main()
