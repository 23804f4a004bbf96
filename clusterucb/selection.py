"""Per-epoch selection: full matching, ClusterUCB under a gradient budget, and random.

The ClusterUCB loop (spec §6) is written against an injected ``reward_fn``
(pool indices -> influence scores, NaN for a failed sample), so it can be run
on synthetic arms in tests and on real gradients in the workflow alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from clusterucb.bandit import ArmState, BanditPolicy
from clusterucb.logsetup import progress

log = logging.getLogger(__name__)

RewardFn = Callable[[np.ndarray], np.ndarray]


def n_selected(n_pool: int, top_p: float) -> int:
    """Selection size ``int(N * top_p)`` (spec §6.6)."""
    k = int(n_pool * top_p)
    if k < 1:
        raise ValueError(f"top_p={top_p} of a pool of {n_pool} selects nothing")
    return k


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest finite scores, best first; ties broken by index (stable)."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(scores))
    order = finite[np.argsort(-scores[finite], kind="stable")]
    if len(order) < k:
        log.warning("only %d scored samples for a selection of %d; selecting all of them", len(order), k)
    return order[:k]


def random_subset(n_pool: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n_pool, size=k, replace=False))


@dataclass
class Draw:
    step: int  # 0 for the cold start, then one step per policy decision
    phase: str  # "cold_start" or "ucb"
    cluster: int
    index: int  # pool index of the sample
    score: float  # NaN when the sample's gradient failed
    arm_value: float  # the policy's index of the chosen arm (NaN in the cold start / first pull)


@dataclass
class BudgetPlan:
    cold_start: dict[int, int]  # arm -> draws in the cold start
    horizon: int  # draws after the cold start

    @property
    def total(self) -> int:
        return sum(self.cold_start.values()) + self.horizon


def plan_budget(cluster_sizes: Sequence[int], n_pool: int, budget: float, csp: float) -> BudgetPlan:
    """Cold start: max(int(|c| * csp), 1) draws per non-empty cluster (if csp > 0), then
    ``int(N * (budget - csp))`` UCB draws, so about ``budget * N`` gradients in all (spec §6.2)."""
    if not 0 <= csp <= budget <= 1:
        raise ValueError(f"need 0 <= csp <= budget <= 1, got csp={csp}, budget={budget}")
    cold = {}
    if csp > 0:
        cold = {arm: min(size, max(int(size * csp), 1)) for arm, size in enumerate(cluster_sizes) if size > 0}
    return BudgetPlan(cold, int(n_pool * (budget - csp)))


@dataclass
class ClusterUCBResult:
    draws: list[Draw] = field(default_factory=list)
    arm_state: ArmState | None = None

    def scores_by_index(self) -> dict[int, float]:
        return {d.index: d.score for d in self.draws}


class ClusterUCB:
    """Spend a gradient budget over clusters with a bandit policy."""

    def __init__(self, clusters: Sequence[np.ndarray], policy: BanditPolicy, reward_fn: RewardFn, rng: np.random.Generator, draw_batch: int = 1):
        if draw_batch < 1:
            raise ValueError("draw_batch must be >= 1")
        self.policy = policy
        self.reward_fn = reward_fn
        self.draw_batch = int(draw_batch)
        # Uniform sampling without replacement inside a cluster = walking a seeded
        # permutation of it; O(1) per draw.
        self.queues = [rng.permutation(np.asarray(c, dtype=np.int64)) for c in clusters]
        self.cursor = np.zeros(len(clusters), dtype=np.int64)
        self.state = ArmState.for_sizes([len(q) for q in self.queues])

    def _take(self, arm: int, n: int) -> np.ndarray:
        start = self.cursor[arm]
        chosen = self.queues[arm][start : start + n]
        self.cursor[arm] += len(chosen)
        return chosen

    def run(self, plan: BudgetPlan) -> ClusterUCBResult:
        result = ClusterUCBResult()
        # Cold start: independent of the policy, so all its gradients go in one batched call.
        cold = [(arm, self._take(arm, n)) for arm, n in sorted(plan.cold_start.items())]
        if cold:
            indices = np.concatenate([chosen for _, chosen in cold])
            scores = np.asarray(self.reward_fn(indices), dtype=np.float64)
            offset = 0
            for arm, chosen in cold:
                rewards = scores[offset : offset + len(chosen)]
                offset += len(chosen)
                self.policy.update(self.state, arm, rewards)
                result.draws.extend(Draw(0, "cold_start", arm, int(i), float(r), float("nan")) for i, r in zip(chosen, rewards))
        left, step = plan.horizon, 0
        bar = progress(range(plan.horizon), desc="clusterucb")  # advanced per draw, not per step
        while left > 0:
            if not self.state.valid.any():
                log.warning("every cluster is exhausted with %d draws of the budget left", left)
                break
            step += 1
            arm = self.policy.select(self.state)
            value = self.policy.value(self.state, arm)
            chosen = self._take(arm, min(self.draw_batch, left, int(self.state.remaining[arm])))
            rewards = np.asarray(self.reward_fn(chosen), dtype=np.float64)
            self.policy.update(self.state, arm, rewards)
            left -= len(chosen)
            result.draws.extend(Draw(step, "ucb", arm, int(i), float(r), value) for i, r in zip(chosen, rewards))
            for _ in chosen:
                next(bar, None)
        result.arm_state = self.state
        log.info(
            "ClusterUCB: %d draws (%d cold start), %d failed, %d arms, %d exhausted",
            len(result.draws), sum(plan.cold_start.values()), sum(1 for d in result.draws if not np.isfinite(d.score)),
            len(self.queues), int((~self.state.valid).sum()),
        )
        return result


def clusters_from_labels(labels: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """Pool indices of each non-empty cluster, and the cluster ids they stand for.

    Empty clusters are dropped (they would crash the official cold start);
    negative labels mark samples outside every cluster.
    """
    labels = np.asarray(labels)
    ids = sorted(int(c) for c in np.unique(labels) if c >= 0)
    return [np.flatnonzero(labels == c) for c in ids], ids
