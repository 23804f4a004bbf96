"""prior_knn: the prior's best candidates, corrected as fresh rewards come in by their nearest drawn neighbours.

The prior of a pool sample at a later checkpoint (its warmup feature against the current validation
gradients) misses how the sample's own gradient moved since the warmup. Samples whose warmup features are
close tend to move alike, so each fresh reward also says something about the drawn sample's neighbours:
the budget is spent in calls of ``call_size`` samples, each call on the candidates of highest

    prior(i) + the similarity-weighted mean residual (fresh reward - prior) of i's ``neighbours`` most
               similar drawn samples (cosine of the centred warmup features; negative similarities weigh 0),

and the selection is the top-k of the rewards drawn. Before the first reward it is prior_rerank's order.
Cost beyond prior_rerank: one (n x call_size) similarity product per call, O(n d) per drawn sample, against
a per-sample gradient's O(model) per drawn sample; the features (n x d float32) are held in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clusterucb.infra.logsetup import progress
from clusterucb.selection.select import Draw

NEIGHBOURS = 5  # drawn neighbours whose residuals predict a sample's (3-8 within 0.08 of each other: docs/results.md)
WEIGHT_FLOOR = 1e-9  # a sample whose drawn neighbours are all dissimilar averages them evenly, at a tiny weight


class ResidualNeighbours:
    """Each pool sample's ``m`` most similar drawn samples (centred, normalised features) and their residuals."""

    def __init__(self, features: np.ndarray, m: int = NEIGHBOURS):
        x = np.asarray(features, dtype=np.float32)
        x = x - x.mean(axis=0, keepdims=True)
        self.x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        self.similarity = np.full((len(x), m), -np.inf, dtype=np.float32)
        self.residual = np.zeros((len(x), m), dtype=np.float64)

    def observe(self, indices: np.ndarray, residuals: np.ndarray) -> None:
        """Add drawn samples (pool indices) with their residuals; non-finite residuals (failed gradients) are left out."""
        keep = np.isfinite(residuals)
        indices, residuals = np.asarray(indices)[keep], np.asarray(residuals, dtype=np.float64)[keep]
        if len(indices) == 0:
            return
        m = self.similarity.shape[1]
        similarity = np.concatenate([self.similarity, self.x @ self.x[indices].T], axis=1)
        residual = np.concatenate([self.residual, np.broadcast_to(residuals, (len(self.x), len(indices)))], axis=1)
        best = np.argpartition(-similarity, m - 1, axis=1)[:, :m]
        self.similarity = np.take_along_axis(similarity, best, axis=1)
        self.residual = np.take_along_axis(residual, best, axis=1)

    def predict(self) -> np.ndarray:
        """The predicted residual of every pool sample (0 before any observation)."""
        seen = np.isfinite(self.similarity)
        weight = np.where(seen, np.maximum(self.similarity, 0.0) + WEIGHT_FLOOR, 0.0)
        total = weight.sum(axis=1)
        return np.divide((weight * self.residual).sum(axis=1), total, out=np.zeros(len(total)), where=total > 0)


def prior_knn(
    candidates: np.ndarray,
    prior: np.ndarray,
    budget_draws: int,
    reward_fn: Callable[[np.ndarray], np.ndarray],
    call_size: int,
    neighbours: ResidualNeighbours,
) -> list[Draw]:
    """Spend the budget on ``candidates`` in calls of ``call_size``, each on the best prior + predicted residual
    (ties by pool index); a draw's ``arm_value`` is that corrected prior when it was chosen."""
    candidates = np.asarray(candidates, dtype=np.int64)
    prior = np.asarray(prior, dtype=np.float64)
    open_ = np.ones(len(candidates), dtype=bool)
    draws: list[Draw] = []
    budget_draws = min(budget_draws, len(candidates))
    bar = progress(range(budget_draws), desc="prior_knn")
    step = 0
    while len(draws) < budget_draws:
        value = prior[candidates] + neighbours.predict()[candidates]
        order = np.flatnonzero(open_)[np.argsort(-value[open_], kind="stable")]
        chosen = order[: min(call_size, budget_draws - len(draws))]
        open_[chosen] = False
        part = candidates[chosen]
        rewards = np.asarray(reward_fn(part), dtype=np.float64)
        neighbours.observe(part, rewards - prior[part])
        draws.extend(Draw(step, "prior_knn", -1, int(i), float(r), float(v)) for i, r, v in zip(part, rewards, value[chosen]))
        step += 1
        for _ in part:
            next(bar, None)
    return draws
