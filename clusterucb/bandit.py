"""Clusters as bandit arms: running statistics and UCB policies (spec §6).

State is O(K) running sums (count, sum, sum of squares, samples left), so a
selection or an update costs O(K) and O(1) respectively, never a pass over
past rewards. An arm with no sample left is never chosen (the official code
gives it 0.0 instead of -inf and can pick it; spec §10.4).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class ArmState:
    """Per-arm reward statistics and how many samples each arm has left."""

    counts: np.ndarray
    sums: np.ndarray
    sumsq: np.ndarray
    remaining: np.ndarray

    @classmethod
    def for_sizes(cls, sizes) -> ArmState:
        sizes = np.asarray(sizes, dtype=np.int64)
        zeros = np.zeros(len(sizes))
        return cls(np.zeros(len(sizes), dtype=np.int64), zeros.copy(), zeros.copy(), sizes.copy())

    @property
    def valid(self) -> np.ndarray:
        return self.remaining > 0

    def mean(self) -> np.ndarray:
        return np.divide(self.sums, self.counts, out=np.zeros_like(self.sums), where=self.counts > 0)

    def std(self) -> np.ndarray:
        """Population std (numpy's default ddof=0, as the official code): 0 for a single reward."""
        mean = self.mean()
        var = np.divide(self.sumsq, self.counts, out=np.zeros_like(self.sums), where=self.counts > 0) - mean**2
        return np.sqrt(np.clip(var, 0.0, None))

    def record(self, arm: int, rewards: np.ndarray) -> None:
        """One reward per sample drawn from ``arm``; NaN marks a failed sample (drawn, but no reward)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(rewards) > self.remaining[arm]:
            raise ValueError(f"arm {arm} has {self.remaining[arm]} samples left, cannot draw {len(rewards)}")
        self.remaining[arm] -= len(rewards)
        rewards = rewards[np.isfinite(rewards)]
        self.counts[arm] += len(rewards)
        self.sums[arm] += float(np.sum(rewards))
        self.sumsq[arm] += float(np.sum(np.square(rewards)))


class BanditPolicy(ABC):
    """Chooses the next arm from an :class:`ArmState`; ``update`` folds in the rewards of a draw."""

    name: str

    @abstractmethod
    def index(self, state: ArmState) -> np.ndarray:
        """The value of every arm (higher is better); only valid arms are ever chosen."""

    def select(self, state: ArmState) -> int:
        valid = state.valid
        if not valid.any():
            raise RuntimeError("every arm is exhausted")
        unplayed = valid & (state.counts == 0)
        if unplayed.any():  # play every arm once first, lowest index first
            return int(np.argmax(unplayed))
        values = np.where(valid, self.index(state), -np.inf)
        return int(np.argmax(values))  # ties go to the lowest index, as in the official code

    def update(self, state: ArmState, arm: int, rewards: np.ndarray) -> None:
        state.record(arm, rewards)

    def value(self, state: ArmState, arm: int) -> float:
        """The index of ``arm`` now (for the trace); NaN before its first reward."""
        return float(self.index(state)[arm]) if state.counts[arm] > 0 else float("nan")


class UCBBeta(BanditPolicy):
    """ClusterUCB's modified UCB: U_k = mean_k + beta * std_k."""

    name = "ucb_beta"

    def __init__(self, beta: float = 1.0):
        self.beta = float(beta)

    def index(self, state: ArmState) -> np.ndarray:
        return state.mean() + self.beta * state.std()


class RandomCluster(BanditPolicy):
    """A uniformly random valid arm (the official, unwired ``UCB_Random``)."""

    name = "random_cluster"

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def index(self, state: ArmState) -> np.ndarray:
        return self.rng.random(len(state.counts))

    def value(self, state: ArmState, arm: int) -> float:
        return float("nan")

    def select(self, state: ArmState) -> int:
        valid = np.flatnonzero(state.valid)
        if len(valid) == 0:
            raise RuntimeError("every arm is exhausted")
        return int(self.rng.choice(valid))


def make_policy(name: str, params: dict, rng: np.random.Generator) -> BanditPolicy:
    if name == "ucb_beta":
        return UCBBeta(params.get("beta", 1.0))
    if name == "random_cluster":
        return RandomCluster(rng)
    raise ValueError(f"unknown bandit policy {name!r} (known: ucb_beta, random_cluster)")
