"""Bandit policies, the ClusterUCB budget loop, matching and top-k selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusterucb.features.matching import influence_scores
from clusterucb.selection.bandit import POLICIES, ArmState, RandomCluster, TopQuantile, UCBBeta, make_policy
from clusterucb.selection.select import ClusterUCB, clusters_from_labels, n_selected, plan_budget, top_k


def state_with(rewards: list[list[float]], remaining: list[int]) -> ArmState:
    state = ArmState.for_sizes([len(r) + left for r, left in zip(rewards, remaining)])
    for arm, values in enumerate(rewards):
        if values:
            state.record(arm, np.array(values))
    return state


def test_ucb_beta_picks_the_arm_with_highest_mean_plus_beta_std():
    # arm 0: mean 0.5 std 0; arm 1: mean 0.3 std 0.3; arm 2: mean 0.45 std 0.05
    state = state_with([[0.5, 0.5], [0.0, 0.6], [0.4, 0.5]], [5, 5, 5])
    rng = np.random.default_rng(0)
    assert UCBBeta(rng, beta=0.0).select(state) == 0
    assert UCBBeta(rng, beta=1.0).select(state) == 1  # 0.6 > 0.5 > 0.5
    np.testing.assert_allclose(UCBBeta(rng, 1.0).index(state), [0.5, 0.6, 0.5])


def test_std_is_population_std_and_running_sums_match_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=37)
    state = ArmState.for_sizes([100])
    for chunk in np.array_split(values, 5):
        state.record(0, chunk)
    assert state.mean()[0] == pytest.approx(values.mean())
    assert state.std()[0] == pytest.approx(values.std(ddof=0))
    assert state.remaining[0] == 63


def test_exhausted_arm_is_never_chosen_even_when_it_has_the_best_index():
    # The official code gives exhausted arms 0.0; when every valid UCB is negative
    # it then picks an exhausted arm. Here arm 0 is exhausted and all values are negative.
    state = state_with([[-0.1], [-0.5, -0.6], [-0.4, -0.4]], [0, 3, 3])
    assert not state.valid[0]
    for name in POLICIES:
        for seed in range(5):
            assert make_policy(name, 3, np.random.default_rng(seed), beta=5.0).select(state) != 0, name


def test_unplayed_valid_arm_goes_first_lowest_index():
    state = state_with([[0.9], [], [], [0.1], []], [4, 0, 2, 4, 3])  # arm 1 is empty (size 0); 2 and 4 unplayed
    assert UCBBeta(np.random.default_rng(0), 1.0, tie_break="lowest").select(state) == 2
    picks = {UCBBeta(np.random.default_rng(s), 1.0).select(state) for s in range(20)}
    assert picks == {2, 4}  # seeded random tie-breaking among the unplayed arms, never the empty one


def test_every_arm_exhausted_raises():
    state = state_with([[0.1], [0.2]], [0, 0])
    for name in POLICIES:
        with pytest.raises(RuntimeError, match="exhausted"):
            make_policy(name, 2, np.random.default_rng(0)).select(state)


def test_failed_samples_use_up_the_arm_but_give_no_reward():
    state = ArmState.for_sizes([4])
    state.record(0, np.array([0.5, np.nan, 0.3]))
    assert state.remaining[0] == 1 and state.counts[0] == 2
    assert state.mean()[0] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="cannot draw"):
        state.record(0, np.array([0.1, 0.2]))


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown bandit policy"):
        make_policy("ucb_magic", 3, np.random.default_rng(0))


def test_plan_budget_matches_the_official_arithmetic():
    sizes = [40, 1, 0, 100, 19]
    plan = plan_budget(sizes, n_pool=160, budget=0.2, csp=0.05)
    assert plan.cold_start == {0: 2, 1: 1, 3: 5, 4: 1}  # max(int(|c| csp), 1), empty cluster skipped
    assert plan.horizon == int(160 * (0.2 - 0.05))
    assert plan_budget(sizes, 160, 0.2, 0.0).cold_start == {}
    with pytest.raises(ValueError):
        plan_budget(sizes, 160, budget=0.1, csp=0.2)


def synthetic_pool(sizes, means, sd=0.05, seed=0):
    """Cluster c holds samples whose rewards are N(means[c], sd): a fixed score per pool index."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    rng.shuffle(labels)
    scores = np.array([rng.normal(means[c], sd) for c in labels])
    return labels, scores


def run_ucb(labels, scores, budget, csp, seed=0, draw_batch=1, policy="ucb_beta"):
    members, ids = clusters_from_labels(labels)
    calls = []

    def reward_fn(indices):
        calls.append(np.array(indices))
        return scores[indices]

    rng = np.random.default_rng(seed)
    bandit = ClusterUCB(members, make_policy(policy, len(members), rng), reward_fn, rng, draw_batch)
    plan = plan_budget([len(m) for m in members], len(labels), budget, csp)
    return bandit.run(plan), plan, calls, members


@pytest.mark.parametrize("policy", ["ucb_beta", "ucb1", "ucb_threshhard", "ucb_threshnormal"])
def test_every_ucb_policy_concentrates_on_the_hot_cluster_within_budget(policy):
    sizes = [200, 200, 200, 200, 200]
    labels, scores = synthetic_pool(sizes, means=[0.1, 0.12, 0.6, 0.08, 0.1])
    result, plan, calls, members = run_ucb(labels, scores, budget=0.2, csp=0.02, policy=policy)
    draws = result.draws
    assert len(draws) == plan.total == 5 * 4 + 180  # cold start int(200 * 0.02) per cluster + int(1000 * 0.18)
    drawn = [d.index for d in draws]
    assert len(set(drawn)) == len(drawn)  # without replacement
    ucb = [d for d in draws if d.phase == "ucb"]
    hot = sum(1 for d in ucb if d.cluster == 2)
    # ucb1's exploration bonus (sqrt(2 ln n / n_k) ~ 1 here) dwarfs reward gaps of 0.5: it spreads more.
    assert hot / len(ucb) > (0.4 if policy == "ucb1" else 0.8), hot / len(ucb)
    # Every draw came from the cluster it is attributed to.
    for d in draws:
        assert d.index in set(members[d.cluster].tolist())
    # The cold start is one batched call.
    assert len(calls[0]) == sum(plan.cold_start.values())


@pytest.mark.parametrize("policy", POLICIES)
def test_no_policy_draws_from_an_exhausted_cluster_and_all_stop_when_all_are(policy):
    # A size-1 cluster is exhausted by the cold start; a tiny hot cluster runs out mid-way.
    sizes = [1, 3, 50, 50]
    labels, scores = synthetic_pool(sizes, means=[0.9, 0.8, 0.1, 0.2])
    result, plan, _, _ = run_ucb(labels, scores, budget=1.0, csp=0.05, policy=policy)
    per_cluster = np.bincount([d.cluster for d in result.draws], minlength=4)
    assert per_cluster.tolist() == sizes  # the whole pool, never more than a cluster holds
    assert not result.arm_state.valid.any()
    assert len({d.index for d in result.draws}) == sum(sizes)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_deterministic_and_draw_batch_respects_budget(policy):
    labels, scores = synthetic_pool([30, 30, 30], means=[0.1, 0.5, 0.2], seed=3)
    a, plan, _, _ = run_ucb(labels, scores, budget=0.5, csp=0.1, seed=9, draw_batch=4, policy=policy)
    b, _, _, _ = run_ucb(labels, scores, budget=0.5, csp=0.1, seed=9, draw_batch=4, policy=policy)
    assert [d.index for d in a.draws] == [d.index for d in b.draws]
    assert len(a.draws) == plan.total
    c, _, _, _ = run_ucb(labels, scores, budget=0.5, csp=0.1, seed=10, draw_batch=4, policy=policy)
    assert [d.index for d in a.draws] != [d.index for d in c.draws]


def test_random_cluster_policy_spreads_draws():
    labels, scores = synthetic_pool([100] * 4, means=[0.1, 0.5, 0.2, 0.3])
    result, _, _, _ = run_ucb(labels, scores, budget=0.5, csp=0.0, policy="random_cluster", seed=1)
    counts = np.bincount([d.cluster for d in result.draws], minlength=4)
    assert counts.min() > 30


def test_clusters_from_labels_drops_empty_and_unclustered():
    members, ids = clusters_from_labels(np.array([3, -1, 0, 3, 0, 5]))
    assert ids == [0, 3, 5]
    assert [m.tolist() for m in members] == [[2, 4], [0, 3], [5]]


def test_top_k_skips_failed_samples_and_breaks_ties_by_index():
    scores = np.array([0.2, np.nan, 0.9, 0.2, 0.5])
    assert top_k(scores, 3).tolist() == [2, 4, 0]
    assert top_k(scores, 10).tolist() == [2, 4, 0, 3]
    assert n_selected(1000, 0.05) == 50
    with pytest.raises(ValueError):
        n_selected(10, 0.05)


def test_influence_is_max_over_subtasks_of_mean_over_examples():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(11, 16, generator=g), dim=1)
    val = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    subtask = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = (train @ val.T).reshape(11, 2, 3).mean(-1).max(-1).values  # the official formula
    assert torch.allclose(influence_scores(train, val, subtask), expected, atol=1e-6)
    train[4] = float("nan")
    assert torch.isnan(influence_scores(train, val, subtask)[4])


def test_top_quantile_matches_the_official_sorted_list():
    rng = np.random.default_rng(4)
    quantile = TopQuantile(0.25, n_arms=3)
    seen, arms = [], []
    for _ in range(300):
        reward, arm = float(rng.normal()), int(rng.integers(3))
        quantile.insert(reward, arm)
        seen.append(reward)
        arms.append(arm)
        ordered = sorted(seen)
        tau = ordered[-(int(len(seen) * 0.25) + 1)]  # the official threshold
        assert quantile.tau == tau
        above = np.bincount([a for r, a in zip(seen, arms) if r >= tau], minlength=3)
        assert quantile.above.tolist() == above.tolist()


def test_threshold_policies_follow_the_official_rules():
    rng = np.random.default_rng(0)
    hard = make_policy("ucb_threshhard", 3, rng, ucb_p=0.25, tie_break="lowest")
    normal = make_policy("ucb_threshnormal", 3, rng, ucb_p=0.25, tie_break="lowest")
    state_h, state_n = ArmState.for_sizes([10, 10, 10]), ArmState.for_sizes([10, 10, 10])
    for arm, rewards in ((0, [0.1, 0.2]), (1, [0.9, 0.1]), (2, [0.3, 0.35])):
        hard.update(state_h, arm, np.array(rewards))
        normal.update(state_n, arm, np.array(rewards))
    # 6 rewards: tau = the (int(6 * 0.25) + 1) = 2nd largest = 0.35; shares >= tau: 0, 1/2, 1/2
    assert hard.quantile.tau == 0.35
    np.testing.assert_allclose(hard.index(state_h), [0.0, 0.5, 0.5])
    assert hard.select(state_h) == 1  # tie between 1 and 2: lowest index with tie_break=lowest
    # Normal: 1 - Phi((tau - mean) / std) per arm.
    from math import erfc, sqrt

    expected = [0.5 * erfc(((0.35 - m) / s) / sqrt(2)) for m, s in ((0.15, 0.05), (0.5, 0.4), (0.325, 0.025))]
    np.testing.assert_allclose(normal.index(state_n), expected)
    assert normal.select(state_n) == 1


def test_threshold_policies_fall_back_to_the_best_reward_when_every_share_is_zero():
    rng = np.random.default_rng(0)
    policy = make_policy("ucb_threshhard", 3, rng, ucb_p=0.25, tie_break="lowest")
    state = ArmState.for_sizes([5, 5, 2])
    policy.update(state, 0, np.array([0.5]))
    policy.update(state, 1, np.array([0.2]))
    policy.update(state, 2, np.array([0.9, 0.8]))  # arm 2 holds the top rewards but is now exhausted
    assert not state.valid[2]
    assert policy.index(state)[:2].tolist() == [0.0, 0.0]
    assert policy.select(state) == 0  # the valid arm with the largest reward so far


def test_ucb1_index_is_mean_plus_exploration_bonus():
    state = state_with([[0.2, 0.4], [0.5]], [5, 5])
    bonus = np.sqrt(2 * np.log(3) / np.array([2, 1]))
    np.testing.assert_allclose(make_policy("ucb1", 2, np.random.default_rng(0)).index(state), np.array([0.3, 0.5]) + bonus)


def test_random_cluster_never_picks_an_invalid_arm():
    state = state_with([[0.1], [0.2], [0.3]], [0, 4, 0])
    policy = RandomCluster(np.random.default_rng(0))
    assert {policy.select(state) for _ in range(50)} == {1}


def test_a_killed_reselection_resumes_from_its_reward_log_with_the_same_selection(tmp_path):
    from clusterucb.selection.quality import BudgetedSpec, budgeted_selection, planted_pool
    from clusterucb.selection.reward_cache import RewardLog

    labels, scores = planted_pool(n_clusters=20, n_pool=3000, seed=1)
    spec = BudgetedSpec(method="clusterucb", budget=0.2, csp=0.05, seed=3)
    reference, ref_selected = budgeted_selection(spec, labels, 0.05, lambda i: scores[i], np.random.default_rng(3))

    computed = []

    class Killed(Exception):
        pass

    def dying(indices):
        if len(computed) > 300:
            raise Killed
        computed.extend(indices.tolist())
        return scores[indices]

    with pytest.raises(Killed):
        budgeted_selection(spec, labels, 0.05, RewardLog(tmp_path, "k").wrap(dying), np.random.default_rng(3))
    first = list(computed)
    with open(tmp_path / "rewards.bin", "ab") as handle:
        handle.write(b"\x01\x02\x03")  # a record torn by the kill
    computed.clear()
    resumed_log = RewardLog(tmp_path, "k")
    assert len(resumed_log.known) == len(first)
    result, selected = budgeted_selection(
        spec, labels, 0.05, resumed_log.wrap(lambda i: (computed.extend(i.tolist()), scores[i])[1]), np.random.default_rng(3)
    )
    # Nothing computed twice, everything computed once, and the same draws and selection.
    assert not set(first) & set(computed) and len(first) + len(computed) == len(reference.draws)
    assert [d.index for d in result.draws] == [d.index for d in reference.draws]
    assert np.array_equal(selected, ref_selected)
    # Another key (another checkpoint, run or task) starts over.
    assert RewardLog(tmp_path, "other").known == {}
