"""Clusters as bandit arms: running statistics and the UCB family of the official code (spec §6.5).

Every policy has the same interface: ``select(state) -> arm`` and
``update(state, arm, rewards)``. Bookkeeping is incremental: per-arm running
sums (count, sum, sum of squares, max, samples left) make an update O(1) per
reward, and the quantile threshold of the ``thresh`` policies is kept in a
two-heap order-statistic structure (O(log n) per reward) instead of the
official sorted Python list.

Fixes over the official code (spec §10.4-10.5), always on: an arm with no
sample left is never chosen (the official code gives it 0.0 instead of -inf
and can pick it), arms exhausted by the cold start are marked, empty clusters
are never arms, ``ucb1`` and ``random_cluster`` work. Ties: the official code
takes the lowest arm index (``list.index(max(...))``); by default ties are
broken uniformly at random with the seeded generator (``tie_break="random"``), and
``tie_break="lowest"`` restores the lowest index.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

TIE_BREAKS = ("random", "lowest")  # among arms of equal value: a seeded random one, or the lowest index (official)
POLICIES = ("ucb_beta", "ucb1", "ucb_threshhard", "ucb_threshnormal", "random_cluster")
_POLICY_PARAMS = {"ucb_beta": ("beta",), "ucb1": (), "ucb_threshhard": ("ucb_p",), "ucb_threshnormal": ("ucb_p",), "random_cluster": ()}


def policy_params(name: str) -> tuple[str, ...]:
    """The parameters policy ``name`` reads (a result never depends on another policy's)."""
    if name not in _POLICY_PARAMS:
        raise ValueError(f"unknown bandit policy {name!r} (known: {', '.join(POLICIES)})")
    return _POLICY_PARAMS[name]


@dataclass
class ArmState:
    """Per-arm reward statistics and how many samples each arm has left."""

    sizes: np.ndarray
    counts: np.ndarray  # finite rewards seen
    sums: np.ndarray
    sumsq: np.ndarray
    maxes: np.ndarray
    remaining: np.ndarray
    retired: np.ndarray  # arms taken out before they ran dry (early cluster exhaustion; never by default)

    @classmethod
    def for_sizes(cls, sizes) -> ArmState:
        sizes = np.asarray(sizes, dtype=np.int64)
        zeros = np.zeros(len(sizes))
        return cls(
            sizes.copy(),
            np.zeros(len(sizes), dtype=np.int64),
            zeros.copy(),
            zeros.copy(),
            np.full(len(sizes), -np.inf),
            sizes.copy(),
            np.zeros(len(sizes), dtype=bool),
        )

    @property
    def valid(self) -> np.ndarray:
        return (self.remaining > 0) & ~self.retired

    @property
    def pulls(self) -> np.ndarray:
        return self.sizes - self.remaining

    def mean(self) -> np.ndarray:
        return np.divide(self.sums, self.counts, out=np.zeros_like(self.sums), where=self.counts > 0)

    def std(self) -> np.ndarray:
        """Population std (numpy's default ddof=0, as the official code): 0 for a single reward."""
        mean = self.mean()
        var = np.divide(self.sumsq, self.counts, out=np.zeros_like(self.sums), where=self.counts > 0) - mean**2
        return np.sqrt(np.clip(var, 0.0, None))

    def record(self, arm: int, rewards: np.ndarray, pseudo: bool = False) -> np.ndarray:
        """One reward per sample drawn from ``arm``; NaN marks a failed sample (drawn, but no reward).
        ``pseudo``: rewards that draw no sample (an arm's prior estimate), counted like observed ones.

        Returns the finite rewards.
        """
        rewards = np.asarray(rewards, dtype=np.float64)
        if not pseudo:
            if len(rewards) > self.remaining[arm]:
                raise ValueError(f"arm {arm} has {self.remaining[arm]} samples left, cannot draw {len(rewards)}")
            self.remaining[arm] -= len(rewards)
        rewards = rewards[np.isfinite(rewards)]
        if len(rewards):
            self.counts[arm] += len(rewards)
            self.sums[arm] += float(np.sum(rewards))
            self.sumsq[arm] += float(np.sum(np.square(rewards)))
            self.maxes[arm] = max(self.maxes[arm], float(np.max(rewards)))
        return rewards


class TopQuantile:
    """Threshold tau = the (floor(n * p) + 1)-th largest of the n rewards seen so far.

    Two heaps: ``top`` (a min-heap) holds exactly floor(n * p) + 1 rewards, the
    rest sit in ``bottom`` (a max-heap); tau is the smallest reward in ``top``.
    ``above[k]`` counts arm k's rewards in ``top``, i.e. its rewards >= tau
    (exactly so unless rewards tie with tau). Each insert is O(log n).
    """

    def __init__(self, p: float, n_arms: int):
        if not 0 <= p < 1:
            raise ValueError(f"ucb_p must be in [0, 1), got {p}")
        self.p = p
        self.n = 0
        self.top: list[tuple[float, int, int]] = []  # (reward, seq, arm)
        self.bottom: list[tuple[float, int, int]] = []  # (-reward, seq, arm)
        self.above = np.zeros(n_arms, dtype=np.int64)

    @property
    def tau(self) -> float:
        return self.top[0][0] if self.top else -math.inf

    def insert(self, reward: float, arm: int) -> None:
        entry = (reward, self.n, arm)
        self.n += 1
        if self.top and reward < self.top[0][0]:
            heapq.heappush(self.bottom, (-reward, entry[1], arm))
        else:
            heapq.heappush(self.top, entry)
            self.above[arm] += 1
        size = int(self.n * self.p) + 1
        while len(self.top) > size:
            value, seq, moved = heapq.heappop(self.top)
            self.above[moved] -= 1
            heapq.heappush(self.bottom, (-value, seq, moved))
        while len(self.top) < size and self.bottom:
            value, seq, moved = heapq.heappop(self.bottom)
            self.above[moved] += 1
            heapq.heappush(self.top, (-value, seq, moved))


class BanditPolicy(ABC):
    """Chooses the next arm from an :class:`ArmState`; ``update`` folds in the rewards of a draw."""

    name: str

    def __init__(self, rng: np.random.Generator, tie_break: str = "random"):
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {TIE_BREAKS}, not {tie_break!r}")
        self.rng = rng
        self.tie_break = tie_break

    @abstractmethod
    def index(self, state: ArmState) -> np.ndarray:
        """The value of every arm (higher is better); only valid arms are ever chosen."""

    def _argmax(self, values: np.ndarray, candidates: np.ndarray) -> int:
        """The best candidate; ties to the lowest index (official) or a seeded random one."""
        best = values[candidates].max()
        tied = candidates[values[candidates] == best]
        if self.tie_break == "lowest" or len(tied) == 1:
            return int(tied[0])
        return int(self.rng.choice(tied))

    @staticmethod
    def _valid_arms(state: ArmState) -> np.ndarray:
        valid = np.flatnonzero(state.valid)
        if len(valid) == 0:
            raise RuntimeError("every arm is exhausted")
        return valid

    def select(self, state: ArmState) -> int:
        valid = self._valid_arms(state)
        unplayed = valid[state.counts[valid] == 0]
        if len(unplayed):  # play every arm once first
            return self._argmax(np.zeros(len(state.counts)), unplayed)
        return self._best(state, valid)

    def _best(self, state: ArmState, valid: np.ndarray) -> int:
        """The valid arm with the highest index (every valid arm has been played)."""
        return self._argmax(self.index(state), valid)

    def update(self, state: ArmState, arm: int, rewards: np.ndarray, pseudo: bool = False) -> None:
        state.record(arm, rewards, pseudo)

    def value(self, state: ArmState, arm: int) -> float:
        """The index of ``arm`` now (for the trace); NaN before its first reward."""
        return float(self.index(state)[arm]) if state.counts[arm] > 0 else float("nan")


class UCBBeta(BanditPolicy):
    """ClusterUCB's modified UCB: U_k = mean_k + beta * std_k."""

    name = "ucb_beta"

    def __init__(self, rng: np.random.Generator, beta: float = 1.0, tie_break: str = "random"):
        super().__init__(rng, tie_break)
        self.beta = float(beta)

    def index(self, state: ArmState) -> np.ndarray:
        return state.mean() + self.beta * state.std()


class UCB1(BanditPolicy):
    """U_k = mean_k + sqrt(2 ln(sum_j n_j) / n_k) (the official class, made runnable)."""

    name = "ucb1"

    def index(self, state: ArmState) -> np.ndarray:
        counts = state.counts.astype(np.float64)
        total = max(counts.sum(), 1.0)
        bonus = np.sqrt(2.0 * math.log(total) / np.maximum(counts, 1.0))
        return state.mean() + bonus


class _Threshold(BanditPolicy):
    """Shared part of the threshold policies: tau over all rewards, and the max-reward fallback."""

    def __init__(self, rng: np.random.Generator, n_arms: int, ucb_p: float = 0.25, tie_break: str = "random"):
        super().__init__(rng, tie_break)
        self.quantile = TopQuantile(ucb_p, n_arms)

    def update(self, state: ArmState, arm: int, rewards: np.ndarray, pseudo: bool = False) -> None:
        for reward in state.record(arm, rewards, pseudo):
            self.quantile.insert(float(reward), arm)

    def _best(self, state: ArmState, valid: np.ndarray) -> int:
        values = self.index(state)
        if not (values[valid] > 0).any():  # official fallback: the valid arm with the best reward so far
            return self._argmax(state.maxes, valid)
        return self._argmax(values, valid)


class UCBThreshHard(_Threshold):
    """U_k = share of arm k's rewards at or above tau."""

    name = "ucb_threshhard"

    def index(self, state: ArmState) -> np.ndarray:
        return np.divide(self.quantile.above.astype(np.float64), state.counts, out=np.zeros(len(state.counts)), where=state.counts > 0)


class UCBThreshNormal(_Threshold):
    """U_k = P(X >= tau) for X ~ N(mean_k, std_k); a zero std gives 1 if mean_k >= tau else 0
    (the official code divides by zero there)."""

    name = "ucb_threshnormal"

    def index(self, state: ArmState) -> np.ndarray:
        mean, std, tau = state.mean(), state.std(), self.quantile.tau
        out = np.where(mean >= tau, 1.0, 0.0)
        positive = std > 0
        z = (tau - mean[positive]) / std[positive]
        out[positive] = [0.5 * math.erfc(v / math.sqrt(2.0)) for v in z]
        return np.where(state.counts > 0, out, 0.0)


class RandomCluster(BanditPolicy):
    """A uniformly random valid arm (the official ``UCB_Random``, which was never wired in)."""

    name = "random_cluster"

    def index(self, state: ArmState) -> np.ndarray:
        return np.zeros(len(state.counts))

    def value(self, state: ArmState, arm: int) -> float:
        return float("nan")

    def select(self, state: ArmState) -> int:
        return int(self.rng.choice(self._valid_arms(state)))


def make_policy(
    name: str, n_arms: int, rng: np.random.Generator, beta: float = 1.0, ucb_p: float = 0.25, tie_break: str = "random"
) -> BanditPolicy:
    if name == "ucb_beta":
        return UCBBeta(rng, beta, tie_break)
    if name == "ucb1":
        return UCB1(rng, tie_break)
    if name == "ucb_threshhard":
        return UCBThreshHard(rng, n_arms, ucb_p, tie_break)
    if name == "ucb_threshnormal":
        return UCBThreshNormal(rng, n_arms, ucb_p, tie_break)
    if name == "random_cluster":
        return RandomCluster(rng, tie_break)
    raise ValueError(f"unknown bandit policy {name!r} (known: {', '.join(POLICIES)})")
