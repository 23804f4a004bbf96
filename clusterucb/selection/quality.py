"""Selection quality: recall against the full-budget selection, and budgeted selection simulated on known scores.

With every sample's score at a checkpoint known (an oracle full pass), a
budgeted method can be replayed by looking its rewards up instead of
computing gradients: the draws and the selection are exactly those the
method makes at that checkpoint, so sweeps over policy, budget, cold start,
beta and k cost no gradient at all.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from clusterucb.selection.bandit import make_policy, policy_params
from clusterucb.selection.neighbours import ResidualNeighbours, prior_knn
from clusterucb.selection.runs import BUDGETED, FEATURE_METHODS, PRIOR_METHODS
from clusterucb.selection.select import (
    ClusterUCB,
    ClusterUCBResult,
    PriorGuidance,
    clusters_from_labels,
    n_selected,
    plan_budget,
    prior_rerank,
    top_k,
)


def recall_metrics(
    selected: np.ndarray, drawn: np.ndarray, scores: np.ndarray, k: int, labels: np.ndarray | None = None
) -> dict[str, float]:
    """Rs, Rinf and their variants (spec §9.1) for a selection against the full top-k by ``scores``.

    R_s   = |S ∩ T*| / k;                 R_inf = sum_S s / sum_T* s
    R_inf is reported only where the top-k's influence sum is positive (NaN
    otherwise): with a non-positive denominator the ratio has no meaning (when
    most scores are negative a random subset would "score" R_inf > 1).
    R_inf_clipped uses max(s, 0). R_inf_excess = (sum_S s - k mean(s)) /
    (sum_T* s - k mean(s)) is the share of the top-k's influence *above a random
    selection's* that S captures (random ~ 0, full = 1), whatever the signs.

    The drawn-set recall |D ∩ T*| / k is not reported: it always equals R_s (a
    top-k sample that was drawn is also in the drawn set's top-k). Instead,
    ``budget_in_topk_clusters`` is the share of the draws D spent in clusters
    (``labels``) that hold at least one top-k sample: what the bandit's arm
    choice achieved, independent of the final cut (NaN without labels or draws).
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = top_k(scores, k)
    true_set = set(truth.tolist())
    selected = np.asarray(selected, dtype=np.int64)
    drawn = np.asarray(drawn, dtype=np.int64)
    mass = scores[truth].sum()
    clipped = np.clip(scores, 0.0, None)
    clipped_mass = clipped[truth].sum()
    baseline = k * np.nanmean(scores)
    excess = mass - baseline
    in_topk_clusters = float("nan")
    if labels is not None and len(drawn):
        labels = np.asarray(labels)
        hot = np.unique(labels[truth][labels[truth] >= 0])
        in_topk_clusters = float(np.isin(labels[drawn], hot).mean())
    return {
        "Rs": len(true_set & set(selected.tolist())) / k,
        "Rinf": float(np.nansum(scores[selected]) / mass) if mass > 0 else float("nan"),
        "Rinf_clipped": float(np.nansum(clipped[selected]) / clipped_mass) if clipped_mass else float("nan"),
        "Rinf_excess": float((np.nansum(scores[selected]) - baseline) / excess) if excess > 0 else float("nan"),
        "budget_in_topk_clusters": in_topk_clusters,
    }


RANDOM_DRAW_CALL = 512  # samples per reward call of random_draw (its draws do not depend on rewards)


@dataclass(frozen=True)
class BudgetedSpec:
    """One budgeted selection: ClusterUCB with a policy (and, beyond the paper, prior guidance), uniform
    draws (random_draw), the prior's best candidates re-ranked by fresh gradients (prior_rerank), or the same
    with the prior corrected by the drawn neighbours' residuals as rewards come in (prior_knn)."""

    method: str = "clusterucb"
    policy: str = "ucb_beta"
    budget: float = 0.2
    csp: float = 0.05
    beta: float = 1.0
    ucb_p: float = 0.25
    draw_batch: int = 1
    tie_break: str = "random"
    seed: int = 0
    order: str = "uniform"
    arm_prior: bool = False
    exhaust: bool = False

    @property
    def guidance(self) -> PriorGuidance:
        return PriorGuidance(self.order, self.arm_prior, self.exhaust)

    @property
    def needs_prior(self) -> bool:
        return self.method in PRIOR_METHODS or (self.method == "clusterucb" and self.guidance.needs_prior)

    @property
    def needs_features(self) -> bool:
        """prior_knn reads the warmup features (who is whose neighbour)."""
        return self.method in FEATURE_METHODS


def budgeted_selection(
    spec: BudgetedSpec,
    labels: np.ndarray,
    top_p: float,
    reward_fn,
    rng: np.random.Generator,
    prior: np.ndarray | None = None,
    features: np.ndarray | None = None,
):
    """Run a budgeted method over the pool; returns the ClusterUCB result (draws, arm state) and the selected indices.

    ``labels`` gives each pool index its cluster (negative: not clusterable).
    random_draw spends the same budget uniformly over the clusterable pool
    (one arm, no cold start), then keeps the top-k of what it drew. Its draws do
    not depend on rewards (one arm walks one seeded permutation), so it asks for
    them in calls of ``RANDOM_DRAW_CALL`` samples: the same draws and selection
    as one at a time, batched. prior_rerank spends the budget (int(N * budget)
    draws) on the clusterable samples of highest ``prior``, in calls of the same
    size. prior_knn (``features``: the pool's warmup features, in pool order) draws in calls of ``draw_batch``,
    each on the best prior corrected by the drawn neighbours' residuals (clusterucb/selection/neighbours.py).
    Either way the selection is the top-k of the rewards drawn.
    """
    k = n_selected(len(labels), top_p)
    if spec.needs_prior and prior is None:
        raise ValueError(f"{spec.method} with {spec.guidance} needs the prior scores of the pool")
    if spec.needs_features and features is None:
        raise ValueError(f"{spec.method} needs the pool's warmup features")
    clusterable = np.flatnonzero(np.asarray(labels) >= 0)
    if spec.method == "prior_rerank":
        draws = prior_rerank(clusterable, prior, int(len(labels) * spec.budget), reward_fn, RANDOM_DRAW_CALL)
        result = ClusterUCBResult(draws=draws)
    elif spec.method == "prior_knn":
        neighbours = ResidualNeighbours(features)
        draws = prior_knn(clusterable, prior, int(len(labels) * spec.budget), reward_fn, spec.draw_batch, neighbours)
        result = ClusterUCBResult(draws=draws)
    else:
        if spec.method == "clusterucb":
            members, _ = clusters_from_labels(labels)
            csp, policy_name, draw_batch, guidance = spec.csp, spec.policy, spec.draw_batch, spec.guidance
        elif spec.method == "random_draw":
            members = [np.flatnonzero(np.asarray(labels) >= 0)]
            csp, policy_name, guidance = 0.0, "random_cluster", PriorGuidance()
            draw_batch = max(spec.draw_batch, RANDOM_DRAW_CALL)
        else:
            raise ValueError(f"{spec.method!r} is not a budgeted method ({', '.join(BUDGETED)})")
        policy = make_policy(policy_name, len(members), rng, beta=spec.beta, ucb_p=spec.ucb_p, tie_break=spec.tie_break)
        bandit = ClusterUCB(members, policy, reward_fn, rng, draw_batch, prior=prior, guidance=guidance, k=k)
        result = bandit.run(plan_budget([len(m) for m in members], len(labels), spec.budget, csp))
    scores = np.array([d.score for d in result.draws])
    indices = np.array([d.index for d in result.draws], dtype=np.int64)
    selected = indices[top_k(scores, k)]
    return result, selected


def simulate(
    spec: BudgetedSpec,
    labels: np.ndarray,
    scores: np.ndarray,
    top_p: float,
    rng: np.random.Generator | None = None,
    prior: np.ndarray | None = None,
    features: np.ndarray | None = None,
) -> dict:
    """Replay a budgeted method with rewards looked up in ``scores``; its recall and cost."""
    rng = rng if rng is not None else np.random.default_rng(spec.seed)
    scores = np.asarray(scores, dtype=np.float64)
    result, selected = budgeted_selection(spec, labels, top_p, lambda idx: scores[idx], rng, prior=prior, features=features)
    drawn = np.array([d.index for d in result.draws], dtype=np.int64)
    k = n_selected(len(labels), top_p)
    return {
        **recall_metrics(selected, drawn, scores, k, labels),
        "n_gradients": len(drawn),
        "cumulative_reward": float(np.nansum(scores[drawn])),
        "retired_arms": result.retired,
    }


def static_recall(earlier_scores: np.ndarray, scores: np.ndarray, top_p: float) -> dict:
    """The static baseline: the top-k by an earlier checkpoint's scores (epoch 1's full matching, kept), recalled
    against the top-k now. It computes no gradient at this checkpoint."""
    k = n_selected(len(scores), top_p)
    selected = top_k(np.asarray(earlier_scores, dtype=np.float64), k)
    return {**recall_metrics(selected, np.array([], dtype=np.int64), scores, k), "n_gradients": 0, "cumulative_reward": 0.0}


def random_subset_recall(scores: np.ndarray, top_p: float, seed: int) -> dict:
    """The Random baseline: a uniform top-p subset, no gradients."""
    k = n_selected(len(scores), top_p)
    selected = np.random.default_rng(seed).choice(len(scores), size=k, replace=False)
    return {**recall_metrics(selected, np.array([], dtype=np.int64), scores, k), "n_gradients": 0, "cumulative_reward": 0.0}


def full_recall(scores: np.ndarray, top_p: float) -> dict:
    """Full matching (Dynamic / LESS at one checkpoint): every gradient, recall 1 by definition."""
    k = n_selected(len(scores), top_p)
    selected = top_k(scores, k)
    return {
        **recall_metrics(selected, np.arange(len(scores)), scores, k),
        "n_gradients": len(scores),
        "cumulative_reward": float(np.nansum(scores)),
    }


def expand_grid(grid: dict, ks: list[int]) -> list[tuple[BudgetedSpec, int]]:
    """Every (spec, k) of a sweep grid; random_draw, prior_rerank and prior_knn points ignore the clustering parameters
    (deduplicated), the prior methods also the seed (replayed once), and the prior-guidance axes (order, arm_prior,
    exhaust) apply to clusterucb only."""

    def values(key, default):
        return list(grid.get(key) or default)

    points: dict[tuple, tuple[BudgetedSpec, int]] = {}
    for method in values("method", ["clusterucb"]):
        if method not in BUDGETED:
            raise ValueError(f"{method!r} is not a budgeted method ({', '.join(BUDGETED)})")
        if method in ("random_draw", *PRIOR_METHODS):  # no clusters, no cold start, no policy parameters
            seeds = [0] if method in PRIOR_METHODS else values("seed", [0])  # the prior methods draw no random number
            for budget, seed in itertools.product(values("budget", [0.2]), seeds):
                spec = BudgetedSpec(method=method, policy="random_cluster", budget=budget, csp=0.0, seed=seed)
                points[(spec, ks[0])] = (spec, ks[0])
            continue
        guided = itertools.product(values("order", ["uniform"]), values("arm_prior", [False]), values("exhaust", [False]))
        for (order, arm_prior, exhaust), policy in itertools.product(list(guided), values("policy", ["ucb_beta"])):
            # A policy does not depend on another policy's parameter: sweep only its own.
            betas = values("beta", [1.0]) if "beta" in policy_params(policy) else [1.0]
            ucb_ps = values("ucb_p", [0.25]) if "ucb_p" in policy_params(policy) else [0.25]
            for budget, csp, beta, ucb_p, k, seed in itertools.product(
                values("budget", [0.2]), values("csp", [0.05]), betas, ucb_ps, values("k", ks), values("seed", [0])
            ):
                spec = BudgetedSpec(
                    method=method,
                    policy=policy,
                    budget=budget,
                    csp=csp,
                    beta=beta,
                    ucb_p=ucb_p,
                    seed=seed,
                    order=order,
                    arm_prior=bool(arm_prior),
                    exhaust=bool(exhaust),
                )
                points[(spec, k)] = (spec, k)
    return list(points.values())


def planted_pool(n_clusters: int = 60, n_pool: int = 6000, n_hot: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic pool with planted high-influence clusters: (labels, scores).

    Cluster sizes vary (Dirichlet); most clusters have scores around 0 with
    cluster-specific means in [-0.1, 0.1]; ``n_hot`` clusters hold most of the
    high-influence samples (means 0.3-0.5). Scores are cosine-like, in [-1, 1].
    """
    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, np.round(rng.dirichlet(np.full(n_clusters, 2.0)) * n_pool)).astype(int)
    labels = np.repeat(np.arange(n_clusters), sizes)
    means = rng.uniform(-0.1, 0.1, n_clusters)
    spreads = rng.uniform(0.03, 0.08, n_clusters)
    hot = rng.choice(n_clusters, size=n_hot, replace=False)
    means[hot] = rng.uniform(0.3, 0.5, n_hot)
    scores = np.clip(rng.normal(means[labels], spreads[labels]), -1, 1)
    order = rng.permutation(len(labels))
    return labels[order], scores[order]


def eta_squared(labels: np.ndarray, scores: np.ndarray) -> float:
    """Share of the variance of ``scores`` explained by the grouping ``labels`` (between-group / total SS)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    total = float(((scores - scores.mean()) ** 2).sum())
    if total == 0:
        return float("nan")
    _, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse)
    means = np.bincount(inverse, weights=scores) / counts
    return float((counts * (means - scores.mean()) ** 2).sum() / total)


def cluster_concentration(labels: np.ndarray, scores: np.ndarray, top_p: float, n_random: int = 200, seed: int = 0) -> dict:
    """How much clusters concentrate influence (the method's premise), and their size distribution.

    eta2: between-cluster / total variance of the scores over the clustered
    samples; eta2_random_*: the same for random groupings of the same sizes
    (the labels permuted, ``n_random`` times, seeded), the value eta2 would
    take if clusters knew nothing about influence. topk_clusters: clusters
    holding at least one top-k sample (fewer = more concentrated), with the
    same count for the random groupings.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    keep = (labels >= 0) & np.isfinite(scores)
    lab, sc = labels[keep], scores[keep]
    sizes = np.bincount(np.unique(lab, return_inverse=True)[1])
    k = n_selected(len(scores), top_p)
    truth = top_k(np.where(keep, scores, -np.inf), k)
    hot = set(labels[truth][labels[truth] >= 0].tolist())
    rng = np.random.default_rng(seed)
    random_eta, random_hot = [], []
    in_top = np.isin(np.flatnonzero(keep), truth)
    for _ in range(n_random):
        permuted = rng.permutation(lab)
        random_eta.append(eta_squared(permuted, sc))
        random_hot.append(len(np.unique(permuted[in_top])))
    return {
        "n_clusters": int(len(sizes)),
        "size_min": int(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()),
        "largest_share": float(sizes.max() / sizes.sum()),
        "singletons": int((sizes == 1).sum()),
        "eta2": eta_squared(lab, sc),
        "eta2_random_mean": float(np.mean(random_eta)),
        "eta2_random_std": float(np.std(random_eta)),
        "topk_clusters": len(hot),
        "topk_clusters_random": float(np.mean(random_hot)),
    }
