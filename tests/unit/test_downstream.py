"""The comparison over training seeds: means, paired differences with a bootstrap interval, Dynamic's gain."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clusterucb.pipeline.downstream import bootstrap_interval, mean_over_tasks, seed_summary, sign_flip_p, variant_of
from clusterucb.pipeline.report import seeds_appendix


def comparison(losses: dict[str, list[float]], task: str = "gsm8k") -> pd.DataFrame:
    """Comparison rows: ``losses[variant]`` per training seed (42, 1, 2); base has one row and no seed."""
    rows = [{"task": task, "run": "base", "method": "base", "train_seed": None, "score": None, "target_loss": 2.0, "pool_gradients": 0}]
    for variant, values in losses.items():
        for seed, loss in zip([42, 1, 2], values):
            run = variant if seed == 42 else f"{variant}__train_seed-{seed}"
            method = variant.split("__")[0]
            rows.append(
                {"task": task, "run": run, "method": method, "train_seed": seed, "score": 0.5, "target_loss": loss, "pool_gradients": 100}
            )
    return pd.DataFrame(rows).astype({"train_seed": "Int64"})


def test_variant_strips_only_the_training_seed():
    assert variant_of("clusterucb__order-prior__train_seed-2") == "clusterucb__order-prior"
    assert variant_of("clusterucb__train_seed-1__ucb_p-0.5") == "clusterucb__ucb_p-0.5"
    assert variant_of("dynamic") == "dynamic"


def test_seed_summary_by_hand():
    frame = comparison(
        {"dynamic": [1.0, 1.1, 0.9], "random_draw": [1.6, 1.7, 1.5], "static": [1.8, 1.8, 1.8], "clusterucb": [1.1, 1.2, 1.0]}
    )
    summary = seed_summary(frame).set_index("variant")
    assert summary.loc["base", "seeds"] == 1 and summary.loc["dynamic", "seeds"] == 3
    assert summary.loc["clusterucb", "target_loss"] == pytest.approx(1.1)
    assert summary.loc["clusterucb", "target_loss_std"] == pytest.approx(0.1)
    # Dynamic lowers the loss by 1.0; ClusterUCB by 0.9 of it; random_draw by 0.4.
    assert summary.loc["clusterucb", "of_dynamic_gain"] == pytest.approx(0.9)
    assert summary.loc["random_draw", "of_dynamic_gain"] == pytest.approx(0.4)
    # Paired against random_draw: -0.5 at every seed, so the interval is a point and excludes 0; yet 3 seeds
    # are too few for the sign-flip test (p = 2/8), so it is not marked beyond seed noise.
    assert summary.loc["clusterucb", "vs_random_draw"] == "-0.5000 [-0.5000, -0.5000] p=0.25"
    assert summary.loc["random_draw", "vs_random_draw"] == ""
    assert summary.loc["clusterucb", "vs_static"].startswith("-0.7000 [")
    over = mean_over_tasks(seed_summary(pd.concat([frame, comparison({"dynamic": [1.5] * 3, "clusterucb": [1.5] * 3}, task="mmlu")])))
    assert over.set_index("variant").loc["clusterucb", "of_dynamic_gain"] == pytest.approx((0.9 + 1.0) / 2)


def test_the_share_of_dynamics_gain_is_undefined_where_dynamic_does_not_improve():
    worse = seed_summary(comparison({"dynamic": [2.5, 2.5, 2.5], "clusterucb": [1.9, 1.9, 1.9]})).set_index("variant")
    assert np.isnan(worse.loc["clusterucb", "of_dynamic_gain"])
    missing = seed_summary(comparison({"clusterucb": [1.9, 1.9, 1.9]})).set_index("variant")
    assert np.isnan(missing.loc["clusterucb", "of_dynamic_gain"])


def test_the_share_is_undefined_where_dynamics_gain_is_inside_its_seed_noise():
    """MMLU of 2026-12-06: Dynamic 0.014 below base with a seed std of 0.013 gave shares of 1.77 and -18.96."""
    # Dynamic's gain 0.02, its mean's standard error 0.1 / sqrt(3) = 0.058: inside the noise.
    noisy = comparison({"dynamic": [1.88, 2.08, 1.98], "clusterucb": [1.95, 1.96, 1.97]}, task="mmlu")
    # Dynamic's gain 1.0 with the same spread: a gain; ClusterUCB keeps 0.9 of it.
    clear = comparison({"dynamic": [0.9, 1.1, 1.0], "clusterucb": [1.1, 1.1, 1.1]})
    summary = seed_summary(pd.concat([noisy, clear]))
    by_task = summary.set_index(["task", "variant"])
    assert np.isnan(by_task.loc[("mmlu", "clusterucb"), "of_dynamic_gain"])
    assert np.isnan(by_task.loc[("mmlu", "dynamic"), "of_dynamic_gain"])
    assert by_task.loc[("gsm8k", "clusterucb"), "of_dynamic_gain"] == pytest.approx(0.9)
    over = mean_over_tasks(summary).set_index("variant")
    # The average is over the one task with a gain, and says so; pool gradients over both.
    assert over.loc["clusterucb", "of_dynamic_gain"] == pytest.approx(0.9)
    assert (over.loc["clusterucb", "tasks"], over.loc["clusterucb", "tasks_with_share"]) == (2, 1)
    text = seeds_appendix(pd.concat([noisy, clear]))
    assert "| clusterucb | 2 | 1 | 0.9000 | 100.0000 |" in text


def test_one_dynamic_seed_counts_any_gain():
    one = comparison({"dynamic": [1.99], "clusterucb": [1.995, 1.995, 1.995]})
    assert seed_summary(one).set_index("variant").loc["clusterucb", "of_dynamic_gain"] == pytest.approx(0.5)


def test_an_interval_that_straddles_zero_is_not_starred():
    frame = comparison({"random_draw": [1.5, 1.5, 1.5], "clusterucb": [1.3, 1.7, 1.45]})
    text = seed_summary(frame).set_index("variant").loc["clusterucb", "vs_random_draw"]
    assert text.startswith("-0.0167 [") and not text.endswith("*")


def test_bootstrap_interval_is_seeded_and_contains_the_mean():
    differences = np.array([-0.3, -0.1, -0.2])
    low, high = bootstrap_interval(differences)
    assert (low, high) == bootstrap_interval(differences)
    assert -0.3 <= low <= differences.mean() <= high <= -0.1


def test_the_comparison_has_the_seed_section_only_with_seeds():
    one_seed = comparison({"dynamic": [1.0]})
    assert seeds_appendix(one_seed) == ""
    text = seeds_appendix(comparison({"dynamic": [1.0, 1.1, 0.9], "random_draw": [1.6, 1.5, 1.7]}))
    assert "## Over training seeds" in text and "| gsm8k | random_draw | random_draw | 3 |" in text


def test_six_seeds_of_the_same_sign_are_beyond_seed_noise():
    assert sign_flip_p(np.array([-0.5, -0.4, -0.6])) == pytest.approx(2 / 8)
    assert sign_flip_p(np.array([-0.1, 0.1, -0.1, 0.1])) == pytest.approx(1.0)
    assert sign_flip_p(-np.ones(6)) == pytest.approx(2 / 64)
    assert sign_flip_p(-np.ones(40)) < 1e-4 and sign_flip_p(np.tile([-0.1, 0.1], 20)) > 0.9  # sampled, not 2^40 patterns
    seeds = [42, 1, 2, 3, 4, 5]
    six = pd.DataFrame(
        [
            {
                "task": "gsm8k",
                "run": f"{v}__train_seed-{s}",
                "method": v,
                "train_seed": s,
                "score": None,
                "target_loss": loss,
                "pool_gradients": 1,
            }
            for v, loss in (("random_draw", 1.5), ("clusterucb", 1.0))
            for s in seeds
        ]
    ).astype({"train_seed": "Int64"})
    assert seed_summary(six).set_index("variant").loc["clusterucb", "vs_random_draw"].endswith("p=0.03 *")
