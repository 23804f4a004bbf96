"""Per-epoch selection: full matching, ClusterUCB under a gradient budget, and random.

The ClusterUCB loop (spec §6) is written against an injected ``reward_fn``
(pool indices -> influence scores, NaN for a failed sample), so it can be run
on synthetic arms in tests and on real gradients in the workflow alike.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from clusterucb.infra.logsetup import progress
from clusterucb.selection.bandit import ArmState, BanditPolicy

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


@dataclass(frozen=True)
class PriorGuidance:
    """Ways to spend information already paid for, beyond the paper (each off by default, where the loop
    is exactly the paper's). The prior of a pool sample is its *warmup* feature's influence on the *current*
    checkpoint's validation gradients: no pool gradient is computed for it.

    - ``order="prior"``: draw a cluster's samples in descending prior instead of a seeded uniform order;
    - ``arm_prior=True``: seed each arm with one pseudo-reward, its members' mean prior (= the prior
      influence of the cluster's unnormalised centroid), before the cold start;
    - ``exhaust=True``: retire a cluster once none of its undrawn samples can enter the top-k by the
      prior's own error bound: best remaining prior + the largest (reward - prior) seen so far below
      the k-th best reward so far.
    """

    order: str = "uniform"
    arm_prior: bool = False
    exhaust: bool = False

    def __post_init__(self):
        if self.order not in ("uniform", "prior"):
            raise ValueError(f"order must be 'uniform' or 'prior', got {self.order!r}")

    @property
    def needs_prior(self) -> bool:
        return self.order == "prior" or self.arm_prior or self.exhaust


@dataclass
class ClusterUCBResult:
    draws: list[Draw] = field(default_factory=list)
    arm_state: ArmState | None = None
    retired: int = 0  # arms retired early (PriorGuidance.exhaust)

    def scores_by_index(self) -> dict[int, float]:
        return {d.index: d.score for d in self.draws}


class _Exhaustion:
    """Which clusters can still contribute to the top-k, judged by the prior's observed error (PriorGuidance.exhaust).

    Per arm, its members in descending prior and a pointer to the best undrawn one: a draw moves only its
    arm's pointer, and the check over all arms is one vectorised comparison."""

    def __init__(self, queues: list[np.ndarray], prior: np.ndarray, k: int):
        self.prior = prior
        self.k = k
        self.top: list[float] = []  # min-heap of the k best rewards so far
        self.error = -np.inf  # the largest reward - prior seen so far
        self.drawn = np.zeros(len(prior), dtype=bool)
        self.by_prior = [q[np.argsort(-prior[q], kind="stable")] for q in queues]
        self.pointer = np.zeros(len(queues), dtype=np.int64)
        self.best_left = np.array([prior[q[0]] if len(q) else -np.inf for q in self.by_prior])

    def observe(self, arm: int, indices: np.ndarray, rewards: np.ndarray) -> None:
        self.drawn[indices] = True
        members, at = self.by_prior[arm], int(self.pointer[arm])
        while at < len(members) and self.drawn[members[at]]:
            at += 1
        self.pointer[arm] = at
        self.best_left[arm] = self.prior[members[at]] if at < len(members) else -np.inf
        for index, reward in zip(indices, rewards):
            if not np.isfinite(reward):
                continue
            self.error = max(self.error, float(reward - self.prior[index]))
            if len(self.top) < self.k:
                heapq.heappush(self.top, float(reward))
            elif reward > self.top[0]:
                heapq.heapreplace(self.top, float(reward))

    def hopeless(self) -> np.ndarray:
        """Arms none of whose undrawn samples can beat the k-th best reward, by the prior plus its largest error."""
        if len(self.top) < self.k:
            return np.zeros(len(self.best_left), dtype=bool)
        return self.best_left + self.error < self.top[0]


class ClusterUCB:
    """Spend a gradient budget over clusters with a bandit policy.

    ``prior`` (one value per pool index) and ``guidance`` switch on the prior-guided variants
    (:class:`PriorGuidance`); ``k``, the selection size, is needed for early exhaustion.
    """

    def __init__(
        self,
        clusters: Sequence[np.ndarray],
        policy: BanditPolicy,
        reward_fn: RewardFn,
        rng: np.random.Generator,
        draw_batch: int = 1,
        prior: np.ndarray | None = None,
        guidance: PriorGuidance = PriorGuidance(),
        k: int | None = None,
    ):
        if draw_batch < 1:
            raise ValueError("draw_batch must be >= 1")
        if guidance.needs_prior and prior is None:
            raise ValueError(f"{guidance} needs a prior score per pool sample")
        if guidance.exhaust and not k:
            raise ValueError("early exhaustion needs the selection size k")
        self.policy = policy
        self.reward_fn = reward_fn
        self.draw_batch = int(draw_batch)
        self.guidance = guidance
        self.prior = None if prior is None else np.asarray(prior, dtype=np.float64)
        if guidance.order == "prior":
            # Best prior first; ties by pool index (a stable sort), so no random number is drawn.
            self.queues = [
                np.asarray(c, dtype=np.int64)[np.argsort(-self.prior[np.asarray(c, dtype=np.int64)], kind="stable")] for c in clusters
            ]
        else:
            # Uniform sampling without replacement inside a cluster = walking a seeded
            # permutation of it; O(1) per draw.
            self.queues = [rng.permutation(np.asarray(c, dtype=np.int64)) for c in clusters]
        self.cursor = np.zeros(len(clusters), dtype=np.int64)
        self.state = ArmState.for_sizes([len(q) for q in self.queues])
        self.exhaustion = _Exhaustion(self.queues, self.prior, int(k)) if guidance.exhaust else None

    def _take(self, arm: int, n: int) -> np.ndarray:
        start = self.cursor[arm]
        chosen = self.queues[arm][start : start + n]
        self.cursor[arm] += len(chosen)
        return chosen

    def _observe(self, arm: int, chosen: np.ndarray, rewards: np.ndarray) -> None:
        self.policy.update(self.state, arm, rewards)
        if self.exhaustion is not None:
            self.exhaustion.observe(arm, chosen, rewards)

    def _retire_hopeless(self) -> int:
        newly = self.state.valid & self.exhaustion.hopeless()
        self.state.retired |= newly
        return int(newly.sum())

    def run(self, plan: BudgetPlan) -> ClusterUCBResult:
        result = ClusterUCBResult()
        if self.guidance.arm_prior:
            for arm, members in enumerate(self.queues):
                if len(members):
                    self.policy.update(self.state, arm, np.array([self.prior[members].mean()]), pseudo=True)
        # Cold start: independent of the policy, so all its gradients go in one batched call.
        cold = [(arm, self._take(arm, n)) for arm, n in sorted(plan.cold_start.items())]
        if cold:
            indices = np.concatenate([chosen for _, chosen in cold])
            scores = np.asarray(self.reward_fn(indices), dtype=np.float64)
            offset = 0
            for arm, chosen in cold:
                rewards = scores[offset : offset + len(chosen)]
                offset += len(chosen)
                self._observe(arm, chosen, rewards)
                result.draws.extend(Draw(0, "cold_start", arm, int(i), float(r), float("nan")) for i, r in zip(chosen, rewards))
        left, step = plan.horizon, 0
        bar = progress(range(plan.horizon), desc="clusterucb")  # advanced per draw, not per step
        while left > 0:
            if self.exhaustion is not None:
                result.retired += self._retire_hopeless()
            if not self.state.valid.any():
                log.warning("every cluster is exhausted with %d draws of the budget left", left)
                break
            step += 1
            arm = self.policy.select(self.state)
            value = self.policy.value(self.state, arm)
            chosen = self._take(arm, min(self.draw_batch, left, int(self.state.remaining[arm])))
            rewards = np.asarray(self.reward_fn(chosen), dtype=np.float64)
            self._observe(arm, chosen, rewards)
            left -= len(chosen)
            result.draws.extend(Draw(step, "ucb", arm, int(i), float(r), value) for i, r in zip(chosen, rewards))
            for _ in chosen:
                next(bar, None)
        result.arm_state = self.state
        log.info(
            "ClusterUCB: %d draws (%d cold start), %d failed, %d arms, %d exhausted, %d retired early",
            len(result.draws),
            sum(plan.cold_start.values()),
            sum(1 for d in result.draws if not np.isfinite(d.score)),
            len(self.queues),
            int((self.state.remaining == 0).sum()),
            result.retired,
        )
        return result


def prior_rerank(candidates: np.ndarray, prior: np.ndarray, budget_draws: int, reward_fn: RewardFn, call_size: int) -> list[Draw]:
    """Spend the budget on the prior's best samples (of ``candidates``), computing their rewards in calls of
    ``call_size``; ties in the prior by pool index. No bandit: the prior picks, fresh gradients re-rank."""
    candidates = np.asarray(candidates, dtype=np.int64)
    chosen = candidates[np.argsort(-np.asarray(prior, dtype=np.float64)[candidates], kind="stable")][:budget_draws]
    draws = []
    for start in range(0, len(chosen), call_size):
        part = chosen[start : start + call_size]
        rewards = np.asarray(reward_fn(part), dtype=np.float64)
        draws.extend(Draw(0, "prior", -1, int(i), float(r), float(prior[i])) for i, r in zip(part, rewards))
    return draws


def clusters_from_labels(labels: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """Pool indices of each non-empty cluster, and the cluster ids they stand for.

    Empty clusters are dropped (they would crash the official cold start);
    negative labels mark samples outside every cluster.
    """
    labels = np.asarray(labels)
    ids = sorted(int(c) for c in np.unique(labels) if c >= 0)
    return [np.flatnonzero(labels == c) for c in ids], ids
