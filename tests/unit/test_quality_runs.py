"""Recall metrics, budgeted selection replayed on known scores, and the run naming of sweeps."""

from __future__ import annotations

import numpy as np
import pytest

from clusterucb.selection.quality import (
    BudgetedSpec,
    cluster_concentration,
    eta_squared,
    expand_grid,
    full_recall,
    planted_pool,
    random_subset_recall,
    recall_metrics,
    simulate,
)
from clusterucb.selection.runs import SHARED_EPOCH1, defaults_from_config, epoch1_runs, expand_runs, make_run


def test_recall_metrics_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.0, -0.5])
    # k = 2: T* = {0, 1}, mass 1.7
    labels = np.array([0, 1, 1, 2, 2, 2])  # top-k samples 0 and 1 sit in clusters 0 and 1
    m = recall_metrics(selected=np.array([0, 2]), drawn=np.array([0, 2, 5]), scores=scores, k=2, labels=labels)
    assert m["Rs"] == 0.5
    assert m["Rinf"] == pytest.approx((0.9 + 0.7) / 1.7)
    assert m["budget_in_topk_clusters"] == pytest.approx(2 / 3)  # draws 0 and 2 in clusters 0, 1; draw 5 in cluster 2
    assert np.isnan(recall_metrics(np.array([0, 2]), np.array([0, 2, 5]), scores, 2)["budget_in_topk_clusters"])
    assert m["Rinf_excess"] == pytest.approx((1.6 - 2 * scores.mean()) / (1.7 - 2 * scores.mean()))
    negative = scores - 1.0  # every score negative: Rinf has no meaning (not reported), the excess share does
    worse = recall_metrics(np.array([4, 5]), np.array([4, 5]), negative, 2)
    assert np.isnan(worse["Rinf"]) and worse["Rinf_excess"] < 0
    assert recall_metrics(np.array([0, 1]), np.array([0, 1]), negative, 2)["Rinf_excess"] == pytest.approx(1.0)
    clipped = recall_metrics(np.array([0, 5]), np.array([0, 5]), scores, 2)
    assert clipped["Rinf"] == pytest.approx((0.9 - 0.5) / 1.7) and clipped["Rinf_clipped"] == pytest.approx(0.9 / 1.7)


def test_planted_pool_clusterucb_at_20_percent_reaches_rinf_09():
    labels, scores = planted_pool(seed=0)
    results = [simulate(BudgetedSpec(method="clusterucb", budget=0.2, csp=0.05, seed=s), labels, scores, top_p=0.05) for s in range(3)]
    for result in results:
        assert result["Rinf"] >= 0.9, result
        assert result["n_gradients"] <= 0.2 * len(labels) + labels.max() + 1  # the cold start rounds up per cluster
    uniform = simulate(BudgetedSpec(method="random_draw", budget=0.2, seed=0), labels, scores, top_p=0.05)
    assert uniform["Rs"] < min(r["Rs"] for r in results)
    assert full_recall(scores, 0.05)["Rs"] == 1.0
    assert random_subset_recall(scores, 0.05, 0)["Rs"] < 0.2


def test_simulation_is_deterministic_and_budget_monotone():
    labels, scores = planted_pool(n_clusters=30, n_pool=2000, seed=3)
    spec = BudgetedSpec(method="clusterucb", policy="ucb_threshhard", budget=0.2, seed=5)
    assert simulate(spec, labels, scores, 0.05) == simulate(spec, labels, scores, 0.05)
    low = simulate(BudgetedSpec(method="random_draw", budget=0.1, seed=1), labels, scores, 0.05)
    high = simulate(BudgetedSpec(method="random_draw", budget=0.5, seed=1), labels, scores, 0.05)
    assert low["n_gradients"] == int(len(labels) * 0.1) and high["n_gradients"] == int(len(labels) * 0.5)
    assert high["Rs"] > low["Rs"]


def test_expand_grid_deduplicates_parameters_random_draw_ignores():
    grid = {
        "method": ["clusterucb", "random_draw"],
        "policy": ["ucb_beta", "ucb1"],
        "budget": [0.1, 0.2],
        "beta": [0.5, 1.0],
        "k": [],
        "seed": [0, 1],
    }
    points = expand_grid(grid, ks=[50])
    clustered = [p for p in points if p[0].method == "clusterucb"]
    uniform = [p for p in points if p[0].method == "random_draw"]
    # ucb_beta: 2 betas x 2 budgets x 2 seeds; ucb1 ignores beta: 2 x 2
    assert len(clustered) == 8 + 4 and len(uniform) == 2 * 2
    assert {k for _, k in points} == {50}
    with pytest.raises(ValueError, match="budgeted"):
        expand_grid({"method": ["dynamic"]}, ks=[5])


DEFAULTS = defaults_from_config(
    {"policy": "ucb_beta", "budget": 0.2, "csp": 0.05, "beta": 1.0, "ucb_p": 0.25, "draw_batch": 1, "tie_break": "random"},
    cluster_k=50,
    seed=42,
)


def test_runs_are_named_by_what_they_change():
    runs = expand_runs(
        ["clusterucb", "random", "dynamic"],
        [{"method": ["clusterucb", "random_draw"], "budget": [0.1, 0.2, 0.3]}, {"method": "clusterucb", "policy": ["ucb1", "ucb_beta"]}],
        DEFAULTS,
    )
    assert sorted(runs) == sorted(
        [
            "clusterucb",
            "random",
            "dynamic",
            "clusterucb__budget-0.1",
            "clusterucb__budget-0.3",
            "random_draw",
            "random_draw__budget-0.1",
            "random_draw__budget-0.3",
            "clusterucb__policy-ucb1",
        ]
    )
    run = runs["clusterucb__budget-0.1"]
    assert run.params["budget"] == 0.1 and run.params["policy"] == "ucb_beta" and run.params["k"] == 50
    assert "ucb_p" not in run.params and "beta" not in runs["clusterucb__policy-ucb1"].params  # unused by the policy
    assert make_run("clusterucb", {"policy": "ucb1", "beta": 3.0}, DEFAULTS).name == "clusterucb__policy-ucb1"
    assert run.checkpoint("mmlu", 1) == f"runs/mmlu/{SHARED_EPOCH1}/epoch-1"  # Dynamic-family runs share epoch 1
    assert run.checkpoint("mmlu", 3) == "runs/mmlu/clusterucb__budget-0.1/epoch-3"
    assert runs["random"].checkpoint("mmlu", 1) == runs["random"].checkpoint("bbh", 1) == "runs/all/random/epoch-1"  # target-independent


def test_training_seeds_make_whole_runs_of_their_own_and_leave_the_master_seeds_runs_alone():
    plain = expand_runs(["clusterucb", "static", "random"], [{"method": "clusterucb", "order": "prior"}], DEFAULTS)
    runs = expand_runs(["clusterucb", "static", "random"], [{"method": "clusterucb", "order": "prior"}], DEFAULTS, [1, 42])
    # The master seed (42) is the plain run; seed 1 adds one run per run, named by it.
    assert sorted(runs) == sorted(
        [*plain, "clusterucb__train_seed-1", "static__train_seed-1", "random__train_seed-1", "clusterucb__order-prior__train_seed-1"]
    )
    for name, run in plain.items():  # nothing the master seed's runs depend on changes
        assert runs[name] == run and runs[name].params == run.params and run.train_seed == 42
    seeded = runs["clusterucb__order-prior__train_seed-1"]
    # Its selection's random choices take its seed too; everything else is the master run's.
    assert seeded.train_seed == 1 and seeded.params == {**runs["clusterucb__order-prior"].params, "seed": 1}
    assert runs["random__train_seed-1"].params == {"seed": 1} and runs["static__train_seed-1"].params == {}
    assert make_run("random_draw", {"train_seed": 3, "seed": 9}, DEFAULTS).params["seed"] == 9  # unless the sweep sets it
    # ... and a sweep's seed is named whenever it is not the run's own, so it never takes another run's name.
    explicit = make_run("random_draw", {"train_seed": 3, "seed": 42}, DEFAULTS)
    assert explicit.params["seed"] == 42 and explicit.name != make_run("random_draw", {"train_seed": 3}, DEFAULTS).name
    # Each seed is a whole run: its own epoch 1 (the same full matching, trained with its seed), then its own epochs.
    assert seeded.checkpoint("gsm8k", 1) == "runs/gsm8k/full_matching__train_seed-1/epoch-1"
    assert seeded.checkpoint("gsm8k", 2) == "runs/gsm8k/clusterucb__order-prior__train_seed-1/epoch-2"
    assert runs["static__train_seed-1"].checkpoint("gsm8k", 1) == "runs/gsm8k/full_matching__train_seed-1/epoch-1"
    assert runs["random__train_seed-1"].checkpoint("gsm8k", 1) == "runs/all/random__train_seed-1/epoch-1"
    assert epoch1_runs(runs, 42) == {SHARED_EPOCH1: 42, "full_matching__train_seed-1": 1}
    assert epoch1_runs(plain, 42) == {SHARED_EPOCH1: 42}
    # A sweep may name a training seed itself.
    assert make_run("dynamic", {"train_seed": 3}, DEFAULTS).name == "dynamic__train_seed-3"
    assert make_run("dynamic", {"train_seed": 42}, DEFAULTS).name == "dynamic"


def test_runs_refuse_parameters_their_method_does_not_use():
    with pytest.raises(ValueError, match="does not depend on"):
        make_run("dynamic", {"budget": 0.1}, DEFAULTS)
    with pytest.raises(ValueError, match="unknown method"):
        make_run("clusterucb_v2", {}, DEFAULTS)
    with pytest.raises(ValueError, match="'method'"):
        expand_runs([], [{"budget": [0.1]}], DEFAULTS)


def test_eta_squared_and_cluster_concentration_against_random_groupings():
    labels, scores = planted_pool(seed=0)
    assert eta_squared(np.zeros(5), np.arange(5.0)) == 0.0
    assert eta_squared(np.arange(5), np.arange(5.0)) == pytest.approx(1.0)
    planted = cluster_concentration(labels, scores, top_p=0.05, seed=0)
    assert planted["eta2"] > planted["eta2_random_mean"] + 10 * planted["eta2_random_std"]
    assert planted["topk_clusters"] < planted["topk_clusters_random"]
    assert planted["n_clusters"] == len(np.unique(labels)) and planted["size_max"] >= planted["size_median"] >= planted["size_min"]
    # Labels that know nothing about the scores explain what random groupings do.
    shuffled = cluster_concentration(np.random.default_rng(1).permutation(labels), scores, top_p=0.05, seed=0)
    assert abs(shuffled["eta2"] - shuffled["eta2_random_mean"]) < 4 * shuffled["eta2_random_std"]
    assert cluster_concentration(labels, scores, 0.05, seed=0) == planted  # seeded


def test_random_draw_asks_for_its_rewards_in_batches_with_the_same_draws():
    from clusterucb.selection.quality import RANDOM_DRAW_CALL, budgeted_selection

    labels, scores = planted_pool(n_clusters=30, n_pool=4000, seed=2)
    labels[::97] = -1  # a few samples without a warmup gradient: never drawn
    calls = []

    def reward(idx):
        calls.append(len(idx))
        return scores[idx]

    spec = BudgetedSpec(method="random_draw", budget=0.3, seed=4)
    result, selected = budgeted_selection(spec, labels, 0.05, reward, np.random.default_rng(4))
    n = int(len(labels) * 0.3)
    assert sum(calls) == n and len(calls) == -(-n // RANDOM_DRAW_CALL) and max(calls) == RANDOM_DRAW_CALL
    # The draws are the first n of one seeded permutation of the clusterable samples, as one at a time would take them.
    expected = np.random.default_rng(4).permutation(np.flatnonzero(labels >= 0))[:n]
    assert np.array_equal([d.index for d in result.draws], expected)
    assert sorted(selected.tolist()) == sorted(expected[np.argsort(-scores[expected], kind="stable")[:200]].tolist())
