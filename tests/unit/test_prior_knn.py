"""prior_knn: the prior corrected by the residuals of the drawn neighbours (clusterucb/selection/neighbours.py)."""

from __future__ import annotations

import numpy as np
import pytest

from clusterucb.selection.neighbours import ResidualNeighbours, prior_knn
from clusterucb.selection.quality import BudgetedSpec, budgeted_selection, expand_grid, simulate
from clusterucb.selection.select import n_selected, top_k


def test_residual_neighbours_by_hand():
    # Centred: the mean of these three is 0, so the features are their own centred versions.
    features = np.array([[1.0, 0.0], [0.8, 0.6], [-1.8, -0.6]])
    neighbours = ResidualNeighbours(features, m=2)
    assert np.all(neighbours.predict() == 0)  # nothing observed
    neighbours.observe(np.array([0]), np.array([0.5]))
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    np.testing.assert_allclose(neighbours.predict(), [0.5, 0.5, 0.5])  # one neighbour: its residual, whatever the weight
    neighbours.observe(np.array([1, 2]), np.array([-0.5, np.nan]))  # a failed gradient (NaN) is not a neighbour
    w0, w1 = np.maximum(x @ x[0], 0) + 1e-9, np.maximum(x @ x[1], 0) + 1e-9
    np.testing.assert_allclose(neighbours.predict(), (0.5 * w0 - 0.5 * w1) / (w0 + w1))


def planted(n=600, d=8, seed=0):
    """The fresh score = the prior + a residual that varies smoothly over the feature space (a linear function of
    the features, twice the prior's spread), so that close samples move alike: what prior_knn assumes."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d))
    prior = rng.normal(size=n)
    direction = rng.normal(size=d)
    fresh = prior + 2.0 * features @ (direction / np.linalg.norm(direction)) + 0.1 * rng.normal(size=n)
    return features.astype(np.float32), prior, fresh


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prior_knn_corrects_the_prior_where_neighbours_move_alike(seed):
    features, prior, fresh = planted(seed=seed)
    n, top_p, budget = len(prior), 0.05, 0.2
    k = n_selected(n, top_p)
    truth = set(top_k(fresh, k).tolist())
    labels = np.zeros(n, dtype=np.int64)

    def recall(method):
        spec = BudgetedSpec(method=method, budget=budget, draw_batch=4)
        return simulate(spec, labels, fresh, top_p, prior=prior, features=features if method == "prior_knn" else None)

    knn, rerank = recall("prior_knn"), recall("prior_rerank")
    assert knn["n_gradients"] == rerank["n_gradients"] == int(n * budget)
    assert knn["Rs"] >= rerank["Rs"] + 0.3, (knn["Rs"], rerank["Rs"])
    _, selected = budgeted_selection(
        BudgetedSpec(method="prior_knn", budget=budget, draw_batch=4), labels, top_p, lambda i: fresh[i], None, prior, features
    )
    assert len(selected) == k and len(set(selected.tolist()) & truth) / k == pytest.approx(knn["Rs"])


def test_prior_knn_starts_as_prior_rerank_draws_each_sample_once_and_only_clusterable_ones():
    features, prior, fresh = planted(n=200, seed=1)
    calls = []

    def reward(indices):
        calls.append(np.asarray(indices).copy())
        return fresh[indices]

    candidates = np.arange(1, 200)  # sample 0 is not clusterable
    draws = prior_knn(candidates, prior, 40, reward, 8, ResidualNeighbours(features))
    drawn = [d.index for d in draws]
    assert len(drawn) == len(set(drawn)) == 40 and 0 not in drawn
    assert [len(c) for c in calls] == [8] * 5
    np.testing.assert_array_equal(calls[0], candidates[np.argsort(-prior[candidates], kind="stable")][:8])
    # Deterministic: no random choice at all.
    again = prior_knn(candidates, prior, 40, lambda i: fresh[i], 8, ResidualNeighbours(features))
    assert [d.index for d in again] == drawn


def test_prior_knn_needs_features_and_a_prior_and_replays_once_per_budget():
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="warmup features"):
        budgeted_selection(BudgetedSpec(method="prior_knn"), labels, 0.2, lambda i: i * 1.0, None, prior=np.zeros(10))
    with pytest.raises(ValueError, match="prior"):
        budgeted_selection(BudgetedSpec(method="prior_knn"), labels, 0.2, lambda i: i * 1.0, None, features=np.eye(10))
    points = expand_grid({"method": ["prior_knn"], "budget": [0.1, 0.2], "policy": ["ucb1"], "k": [5], "seed": [0, 1, 2]}, ks=[5])
    assert sorted(spec.budget for spec, _ in points) == [0.1, 0.2]  # once per budget: no random choice, no seed
    assert all(spec.needs_features and spec.needs_prior for spec, _ in points)
