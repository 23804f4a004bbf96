"""Beyond the paper: the static baseline, prior re-rank, and ClusterUCB guided by a prior (order, arm prior,
early exhaustion). The paper's loop stays the default and unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from clusterucb.selection.bandit import ArmState, make_policy
from clusterucb.selection.quality import BudgetedSpec, budgeted_selection, expand_grid, planted_pool, simulate, static_recall
from clusterucb.selection.runs import defaults_from_config, expand_runs
from clusterucb.selection.select import ClusterUCB, PriorGuidance, clusters_from_labels, n_selected, plan_budget, top_k

SELECTION = {"policy": "ucb_beta", "budget": 0.2, "csp": 0.05, "beta": 1.0, "ucb_p": 0.25, "draw_batch": 1, "tie_break": "random"}


def noisy_prior(scores: np.ndarray, noise: float, seed: int = 0) -> np.ndarray:
    """A prior that knows the scores up to Gaussian noise (what warmup features know of a later checkpoint)."""
    return scores + np.random.default_rng(seed).normal(0, noise, len(scores))


def test_the_paper_loop_is_the_default_and_draws_what_it_always_drew():
    labels, scores = planted_pool(seed=3)
    spec = BudgetedSpec(seed=5)
    first = simulate(spec, labels, scores, 0.05)
    # Guidance switched off explicitly, with a prior at hand that it must not read: the same draws.
    again = simulate(BudgetedSpec(seed=5, order="uniform", arm_prior=False, exhaust=False), labels, scores, 0.05, prior=-scores)
    assert first == again and first["retired_arms"] == 0


def test_prior_order_draws_each_clusters_best_prior_first():
    labels, scores = planted_pool(n_clusters=8, n_pool=400, seed=1)
    members, _ = clusters_from_labels(labels)
    prior = noisy_prior(scores, 0.01)
    rng = np.random.default_rng(0)
    bandit = ClusterUCB(
        members,
        make_policy("ucb_beta", len(members), rng),
        lambda idx: scores[idx],
        rng,
        prior=prior,
        guidance=PriorGuidance(order="prior"),
    )
    result = bandit.run(plan_budget([len(m) for m in members], len(labels), 0.2, 0.05))
    for arm, cluster in enumerate(members):
        drawn = [d.index for d in result.draws if d.cluster == arm]
        expected = cluster[np.argsort(-prior[cluster], kind="stable")][: len(drawn)]
        assert drawn == expected.tolist()


def test_an_arm_prior_is_a_pseudo_reward_that_draws_no_sample():
    state = ArmState.for_sizes([3, 5])
    policy = make_policy("ucb_beta", 2, np.random.default_rng(0))
    policy.update(state, 1, np.array([0.4]), pseudo=True)
    assert state.remaining.tolist() == [3, 5] and state.counts.tolist() == [0, 1] and state.mean()[1] == pytest.approx(0.4)
    labels, scores = planted_pool(seed=2)
    prior = noisy_prior(scores, 0.05)
    blind = simulate(BudgetedSpec(seed=1, csp=0.0), labels, scores, 0.05)
    informed = simulate(BudgetedSpec(seed=1, csp=0.0, arm_prior=True), labels, scores, 0.05, prior=prior)
    assert informed["Rs"] > blind["Rs"]  # without a cold start, blind arms must first be tried one by one


def test_early_exhaustion_retires_clusters_that_cannot_reach_the_top_k():
    labels, scores = planted_pool(seed=4)
    prior = noisy_prior(scores, 0.02)
    plain = simulate(BudgetedSpec(seed=2, order="prior"), labels, scores, 0.05, prior=prior)
    exhaust = simulate(BudgetedSpec(seed=2, order="prior", exhaust=True), labels, scores, 0.05, prior=prior)
    # With a sharp prior, every cluster left is hopeless before the budget is spent: the same recall, fewer gradients.
    assert exhaust["retired_arms"] > 0 and exhaust["n_gradients"] < plain["n_gradients"]
    assert exhaust["Rs"] == plain["Rs"] == 1.0


def test_every_guided_variant_beats_uniform_draws_with_an_informative_prior_and_stays_in_budget():
    labels, scores = planted_pool(seed=6)
    prior = noisy_prior(scores, 0.1)
    random_draw = simulate(BudgetedSpec(method="random_draw", seed=0), labels, scores, 0.05)
    for order in ("uniform", "prior"):
        for arm_prior in (False, True):
            for exhaust in (False, True):
                spec = BudgetedSpec(seed=0, order=order, arm_prior=arm_prior, exhaust=exhaust)
                result = simulate(spec, labels, scores, 0.05, prior=prior)
                assert result["Rs"] > random_draw["Rs"], spec
                assert result["n_gradients"] <= int(0.2 * len(labels)) + 60, spec  # the cold start rounds up per cluster


def test_prior_rerank_spends_the_budget_on_the_prior_best_and_keeps_the_top_k_of_fresh_rewards():
    labels, scores = planted_pool(seed=7)
    labels[:10] = -1  # not clusterable (no warmup gradient): never a candidate
    exact = simulate(BudgetedSpec(method="prior_rerank", budget=0.1), labels, scores, 0.05, prior=scores)
    assert exact["n_gradients"] == int(0.1 * len(labels)) and exact["Rs"] > 0.95
    calls = []

    def reward(idx):
        calls.append(len(idx))
        return scores[idx]

    prior = noisy_prior(scores, 0.2)
    result, selected = budgeted_selection(
        BudgetedSpec(method="prior_rerank", budget=0.2), labels, 0.05, reward, np.random.default_rng(0), prior=prior
    )
    drawn = np.array([d.index for d in result.draws])
    candidates = np.flatnonzero(labels >= 0)
    assert set(drawn) == set(candidates[np.argsort(-prior[candidates], kind="stable")][: int(0.2 * len(labels))])
    assert selected.tolist() == drawn[top_k(scores[drawn], n_selected(len(labels), 0.05))].tolist()
    assert max(calls) == 512 and sum(calls) == len(drawn)
    with pytest.raises(ValueError, match="needs the prior"):
        budgeted_selection(BudgetedSpec(method="prior_rerank"), labels, 0.05, reward, np.random.default_rng(0))


def test_static_recall_is_the_earlier_top_k_against_the_current_one():
    _, scores = planted_pool(seed=8)
    assert static_recall(scores, scores, 0.05)["Rs"] == 1.0 and static_recall(scores, scores, 0.05)["n_gradients"] == 0
    shuffled = np.random.default_rng(0).permutation(scores)
    assert static_recall(shuffled, scores, 0.05)["Rs"] < 0.3


def test_runs_name_the_new_methods_and_keep_the_paper_runs_parameters():
    defaults = defaults_from_config({**SELECTION}, 50, 42)
    runs = expand_runs(
        ["clusterucb", "static", "prior_rerank"], [{"method": "clusterucb", "order": ["uniform", "prior"], "exhaust": [True]}], defaults
    )
    assert runs["clusterucb"].params == {
        "policy": "ucb_beta",
        "budget": 0.2,
        "csp": 0.05,
        "beta": 1.0,
        "draw_batch": 1,
        "tie_break": "random",
        "k": 50,
        "seed": 42,
    }
    assert runs["static"].params == {} and runs["prior_rerank"].params == {"budget": 0.2}
    assert runs["clusterucb__exhaust-true__order-prior"].params["order"] == "prior"
    assert "order" not in runs["clusterucb__exhaust-true"].params and runs["clusterucb__exhaust-true"].params["exhaust"] is True
    assert runs["static"].checkpoint("gsm8k", 1) == "runs/gsm8k/full_matching/epoch-1"
    assert runs["static"].checkpoint("gsm8k", 2) == "runs/gsm8k/static/epoch-2"
    # A config whose default is the prior order: the uniform sweep point is not confused with the default run.
    prior_default = defaults_from_config({**SELECTION, "order": "prior"}, 50, 42)
    both = expand_runs(["clusterucb"], [{"method": "clusterucb", "order": ["uniform"]}], prior_default)
    assert sorted(both) == ["clusterucb", "clusterucb__order-uniform"] and both["clusterucb"].params["order"] == "prior"


def test_the_grid_sweeps_guidance_for_clusterucb_only():
    grid = {
        "method": ["clusterucb", "random_draw", "prior_rerank"],
        "policy": ["ucb_beta"],
        "budget": [0.2],
        "seed": [0, 1],
        "order": ["uniform", "prior"],
        "exhaust": [False, True],
    }
    points = expand_grid(grid, [10])
    by_method = {}
    for spec, _ in points:
        by_method.setdefault(spec.method, []).append(spec)
    # prior_rerank draws no random number: one replay whatever the seeds.
    assert len(by_method["clusterucb"]) == 2 * 2 * 2 and len(by_method["random_draw"]) == 2 and len(by_method["prior_rerank"]) == 1
    assert {(s.order, s.exhaust) for s in by_method["random_draw"] + by_method["prior_rerank"]} == {("uniform", False)}
