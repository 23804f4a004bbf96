"""The rules a library edit affects, from each rule's script and its imports."""

from __future__ import annotations

from clusterucb.infra.affected_rules import REPO, affected_rules, dependencies, main, rule_scripts


def test_every_script_rule_is_found():
    scripts = rule_scripts()
    assert {"kmeans", "evaluate", "grads_pool_shard", "train_epoch", "build_pool"} <= set(scripts)
    assert all(path.is_file() for path in scripts.values())


def test_an_edit_reruns_the_rules_that_import_it_and_no_other():
    assert affected_rules([REPO / "clusterucb/selection/kmeans.py"]) == ["kmeans"]
    assert affected_rules([REPO / "workflow_scripts/recall.py"]) == ["recall"]
    # Lazy imports inside functions count: the evaluation runs programs through the sandbox's bootstrap file.
    assert "evaluate" in affected_rules([REPO / "clusterucb/tasks/sandbox_bootstrap.py"])
    assert "kmeans" not in affected_rules([REPO / "clusterucb/tasks/sandbox.py"])
    # The task registry discovers its modules at run time: each one is a dependency of whoever imports it.
    assert {"evaluate", "prepare_test"} <= set(affected_rules([REPO / "clusterucb/tasks/tydiqa.py"]))


def test_dependencies_follow_imports_transitively():
    deps = dependencies(REPO / "workflow_scripts/grads_pool_shard.py")
    assert {
        REPO / "workflow_scripts/_common.py",
        REPO / "clusterucb/features/gradients.py",
        REPO / "clusterucb/features/projection.py",
    } <= deps


def test_cli_prints_a_forcerun_list(capsys):
    assert main([str(REPO / "clusterucb/selection/kmeans.py"), str(REPO / "workflow_scripts/recall.py")]) == 0
    assert capsys.readouterr().out.split() == ["kmeans", "recall"]
