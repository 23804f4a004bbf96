"""The whole DAG on the tiny config: it runs, reruns exactly what a changed knob needs, and survives a kill."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from dag import CORES, REPO, TINY, planned_job_wildcards, planned_jobs, rule_blocks, run, snakemake_cmd

from clusterucb.data.tokens import TokenTable

pytestmark = pytest.mark.workflow

GRADIENT_JOBS = {"warmup_lora", "grads_pool_shard", "grads_manifest", "kmeans", "build_base_model", "tokenize_pool"}


def selections(workdir: Path) -> dict[str, list[str]]:
    out = {}
    for path in sorted((workdir / "results" / "runs").glob("*/*/epoch-*/selection.parquet")):
        out[str(path.relative_to(workdir))] = pq.read_table(path, columns=["example_id"]).column("example_id").to_pylist()
    return out


TASKS = ("gsm8k", "mmlu", "bbh", "tydiqa", "humaneval")


def test_tiny_dag_writes_the_comparison_table(tiny_run):
    config = yaml.safe_load(TINY.read_text())
    assert tuple(config["target"]["tasks"]) == TASKS
    table = pq.read_table(tiny_run / "results/report/comparison.parquet").to_pandas().set_index(["task", "run"])
    runs = ["base", "clusterucb", "random_draw", "dynamic", "less", "random"]
    assert sorted(table.index) == sorted((t, r) for t in TASKS for r in runs)
    assert (table["target_loss"] > 0).all() and table["score"].between(0, 1).all()
    metrics = table.reset_index().groupby("task").metric.first().to_dict()
    assert metrics == {"gsm8k": "exact_match", "mmlu": "accuracy", "bbh": "exact_match", "tydiqa": "f1", "humaneval": "pass@1"}
    assert (tiny_run / "results/report/comparison.md").read_text().startswith("| task | run |")

    pool = TokenTable.open(tiny_run / "results/data/pool_tokens.arrow").table.to_pandas()
    n_pool = len(pool)
    k = int(n_pool * config["selection"]["top_p"])
    epochs = config["train"]["epochs"]
    selected = selections(tiny_run)
    for task in TASKS:
        t = table.loc[task]
        # Gradients each method computed: the shared warmup pass for the Dynamic family, then its own budget.
        draws = {
            name: [pq.read_table(tiny_run / f"results/runs/{task}/{name}/epoch-{e}/draws.parquet") for e in range(2, epochs + 1)]
            for name in ("clusterucb", "random_draw")
        }
        for name, tables in draws.items():
            assert t.loc[name, "pool_gradients"] == n_pool + sum(len(d) for d in tables), (task, name)
            for e, d in zip(range(2, epochs + 1), tables):
                assert len(d) <= config["selection"]["budget"] * n_pool + config["cluster"]["k"]  # the cold start rounds up per cluster
                assert len(set(d.column("example_id").to_pylist())) == len(d)
                # Budgeted selections come from their drawn samples only.
                assert set(selected[f"results/runs/{task}/{name}/epoch-{e}/selection.parquet"]) <= set(d.column("example_id").to_pylist())
        assert t.loc["dynamic", "pool_gradients"] == epochs * n_pool
        assert t.loc["less", "pool_gradients"] == config["less"]["warmup_epochs"] * n_pool
        assert t.loc["random", "pool_gradients"] == 0 and t.loc["base", "pool_gradients"] == 0
        # The oracle measured recall for every budgeted run.
        for name in ("clusterucb", "random_draw"):
            assert 0 <= t.loc[name, "Rs"] <= 1 and 0 <= t.loc[name, "budget_in_topk_clusters"] <= 1
        assert pd.isna(t.loc["dynamic", "Rs"])
        # Static selections repeat; the Dynamic family shares epoch 1 per target.
        assert (
            selected[f"results/runs/{task}/less/epoch-1/selection.parquet"]
            == selected[f"results/runs/{task}/less/epoch-2/selection.parquet"]
        )
        assert not (tiny_run / f"results/runs/{task}/clusterucb/epoch-1").exists()
        # Every run's selections out as JSONL, in rank order, the last epoch's again as final.jsonl.
        for name in table.loc[task].index.drop("base"):
            for e in range(1, epochs + 1):
                ckpt = f"runs/{'all' if name == 'random' else task}/{'full_matching' if e == 1 and name in ('clusterucb', 'random_draw', 'dynamic') else name}/epoch-{e}"
                lines = [
                    json.loads(line) for line in (tiny_run / f"results/selected/{task}/{name}/epoch-{e}.jsonl").read_text().splitlines()
                ]
                assert [line["example_id"] for line in lines] == selected[f"results/{ckpt}/selection.parquet"], (task, name, e)
                assert {(line["task"], line["run"], line["epoch"]) for line in lines} == {(task, name, e)}
            final = (tiny_run / f"results/selected/{task}/{name}/final.jsonl").read_bytes()
            assert final == (tiny_run / f"results/selected/{task}/{name}/epoch-{epochs}.jsonl").read_bytes()
    for name, ids in selected.items():
        assert len(ids) == k, name
        assert set(ids) <= set(pool.example_id), name
    # Selections differ between targets (they follow each target's validation gradients) ...
    firsts = {selected[f"results/runs/{t}/full_matching/epoch-1/selection.parquet"][0] for t in TASKS}
    assert len({tuple(selected[f"results/runs/{t}/full_matching/epoch-1/selection.parquet"]) for t in TASKS}) > 1, firsts
    # ... but random never reads a target: one selection and training serve them all.
    assert {p.split("/")[2] for p in selected if "/random/" in p} == {"all"}

    # One warmup, one pool gradient pass and one clustering, shared by every target.
    assert len(list((tiny_run / "results/grads/warmup/pool").glob("shard-*.safetensors"))) == config["gradients"]["n_shards"]
    assert sorted(p.name for p in (tiny_run / "results/grads/warmup/scores").glob("*.parquet")) == sorted(f"{t}.parquet" for t in TASKS)

    # The pool by source, in the report.
    pool_md = (tiny_run / "results/report/pool.md").read_text()
    assert all(f"| {name} |" in pool_md for name in config["data"]["sources"]) and "| total |" in pool_md

    # Selection quality sweep and figures.
    quality = pq.read_table(tiny_run / "results/report/quality.parquet").to_pandas()
    assert set(quality.task) == set(TASKS)
    assert set(quality.method) == {"clusterucb", "random_draw", "random", "full", "static"}
    assert set(quality.policy.dropna()) == {"ucb_beta", "ucb1", "ucb_threshhard", "ucb_threshnormal", "random_cluster"}
    assert set(quality.checkpoint) == {"results/warmup"} | {f"results/runs/{t}/full_matching/epoch-1" for t in TASKS}
    assert (quality[quality.method == "full"].Rs == 1.0).all()
    assert quality.budget_in_topk_clusters.dropna().between(0, 1).all()
    clusters = pq.read_table(tiny_run / f"results/quality/{TASKS[0]}/warmup/clusters.parquet").to_pandas()
    assert set(clusters.k) == set(config["quality"]["grid"]["k"] or [config["cluster"]["k"]])
    assert clusters.eta2.between(0, 1).all() and (clusters.eta2_random_std > 0).all()
    assert "eta2" in (tiny_run / "results/report/quality.md").read_text()
    for figure in ("recall_vs_budget", "cluster_influence", "cumulative_reward", *(f"arm_pulls/{t}" for t in TASKS)):
        assert (tiny_run / f"results/report/figures/{figure}.png").stat().st_size > 10_000, figure

    # Validation sets: GSM8K's from the train split; no target's validation or test text is in the pool.
    val = pq.read_table(tiny_run / "results/data/targets/gsm8k/val.parquet").to_pandas()
    assert val.example_id.str.startswith("gsm8k_train-").all() and len(val) == 8
    pool_text = pq.read_table(tiny_run / "results/data/pool.parquet").to_pandas()
    users = " ".join(m[0]["content"] for m in pool_text.messages)
    assert not any(u.removeprefix("Answer the following question.\n\nQuestion: ") in users for u in val.user)
    meta = json.loads(pq.read_schema(tiny_run / "results/data/pool.parquet").metadata[b"clusterucb.decontaminated_against"])
    assert sorted(meta) == sorted(TASKS)
    # HumanEval's validation problems are not evaluated.
    he = json.loads((tiny_run / "results/eval/humaneval/base/metrics.json").read_text())
    assert len(he["excluded_validation_problems"]) == 3 and he["sandbox"]["mode"]
    he_test = pq.read_table(tiny_run / "results/data/targets/humaneval/test.parquet").to_pandas()
    assert not set(he["excluded_validation_problems"]) & {json.loads(f)["task_id"] for f in he_test.fields}

    # Self-describing gradient features.
    manifest = pq.read_schema(tiny_run / "results/grads/warmup/pool/manifest.parquet").metadata
    meta = json.loads(manifest[b"clusterucb.feature_meta"])
    assert meta["proj_dim"] == str(config["gradients"]["proj_dim"]) and meta["model"] == "results/model/base"


def test_html_report_builds(tiny_run, datasets):
    run(tiny_run, datasets, "--report", str(tiny_run / "report.html"))
    html = (tiny_run / "report.html").read_text(errors="replace")
    assert "recall_vs_budget.png" in html and "comparison.md" in html


def test_lint_is_clean(datasets):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(REPO / "Snakefile"), "--config", f"datasets_dir={datasets}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr


def test_snakefiles_are_formatted():
    pytest.importorskip("snakefmt")
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "rules"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_local_hugging_face_model_directory_replaces_the_builtin(tiny_run, datasets, tmp_path):
    model_dir = tiny_run / "results/model/base"
    output = run(tmp_path, datasets, "-n", config=(f"model={model_dir}",)).stdout
    jobs = planned_jobs(output)
    assert "build_base_model" not in jobs and jobs["warmup_lora"] == 1
    assert str(model_dir) in output
    proc = run(tmp_path, datasets, "-n", config=(f"model={tmp_path / 'nowhere'}",), check=False)
    assert proc.returncode != 0 and "config key 'model'" in proc.stdout + proc.stderr


def test_a_hugging_face_hub_id_is_fetched_once_and_used_as_the_model(datasets, tmp_path):
    output = run(tmp_path, datasets, "-n", config=("model=HuggingFaceTB/SmolLM2-135M-Instruct@main",)).stdout
    jobs = planned_jobs(output)
    assert jobs["fetch_hub_model"] == 1 and "build_base_model" not in jobs
    assert "resources/models/hub/HuggingFaceTB--SmolLM2-135M-Instruct@main/config.json" in output


HEAVY = {
    "build_base_model",
    "warmup_lora",
    "less_warmup",
    "grads_pool_shard",
    "grads_val",
    "full_scores",
    "kmeans",
    "select_budgeted",
    "train_epoch",
    "evaluate",
    "quality_sweep",
}
GPU = {"warmup_lora", "less_warmup", "grads_pool_shard", "grads_val", "kmeans", "select_budgeted", "train_epoch", "evaluate"}


def test_every_rule_logs_and_heavy_rules_declare_benchmark_and_resources():
    blocks = rule_blocks()
    assert set(blocks) >= HEAVY
    for name, body in blocks.items():
        assert re.search(r"^\s+log:", body, re.MULTILINE), f"rule {name} has no log:"
        assert "lambda" not in body, f"rule {name} uses a lambda"
    for name in HEAVY:
        body = blocks[name]
        assert re.search(r"^\s+benchmark:", body, re.MULTILINE), name
        assert re.search(r"mem_mb=", body) and re.search(r"runtime=", body), name
        assert ("gpu=1" in body) == (name in GPU), name


def test_slurm_profile_requests_gpus_the_standard_way(datasets, tmp_path):
    profile = yaml.safe_load((REPO / "profiles/slurm/profile.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert "--gres" not in json.dumps(profile) and "--gpus" not in json.dumps(profile)
    proc = subprocess.run(
        snakemake_cmd(tmp_path, datasets, "-n", "--forceall", "--workflow-profile", str(REPO / "profiles/slurm")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shard_job = proc.stdout.split("rule grads_pool_shard:", 1)[1].split("\n\n", 1)[0]
    assert "gpu=1" in shard_job and "cpus_per_gpu=8" in shard_job


def test_changing_beta_or_budget_reuses_gradients_and_clusters(tiny_run, datasets):
    assert planned_jobs(run(tiny_run, datasets, "-n").stdout) == {}
    for change, affected in (("selection={beta: 3.0}", {"clusterucb"}), ("selection={budget: 0.4}", {"clusterucb", "random_draw"})):
        output = run(tiny_run, datasets, "-n", config=(change,)).stdout
        jobs = planned_jobs(output)
        assert jobs["select_budgeted"] == len(affected) * len(TASKS), (change, jobs)
        assert not GRADIENT_JOBS & set(jobs), (change, jobs)
        assert not {"select_top_scores", "select_random", "select_less", "less_warmup", "full_scores"} & set(jobs), (change, jobs)
        # Only the affected runs from epoch 2 on are redone: not the shared epoch 1, not the baselines.
        rerun = set(re.findall(r"run=([A-Za-z0-9_.\-]+)", output))
        assert rerun == affected, (change, rerun)
        assert not re.search(r"epoch=1\b", output), change


REPORT_RULES = {"compare_methods", "quality_table", "plot_cluster_influence", "plot_cumulative_reward", "all"}


def test_one_warmup_gradient_pass_and_clustering_serve_every_target(datasets, tmp_path):
    config = (*LIGHT, "target={tasks: [gsm8k, mmlu]}")
    jobs = planned_job_wildcards(run(tmp_path, datasets, "-n", config=config).stdout)
    count = {}
    for rule, _ in jobs:
        count[rule] = count.get(rule, 0) + 1
    n_shards = yaml.safe_load(TINY.read_text())["gradients"]["n_shards"]
    assert count["warmup_lora"] == 1 and count["kmeans"] == 1 and count["build_pool"] == 1
    assert count["grads_pool_shard"] == n_shards and all(w["ckpt"] == "warmup" for r, w in jobs if r == "grads_pool_shard")
    assert sorted(w["task"] for r, w in jobs if r == "full_scores") == ["gsm8k", "mmlu"]
    assert sorted(w["task"] for r, w in jobs if r == "prepare_validation") == ["gsm8k", "mmlu"]
    # Every target is decontaminated against, targeted or not: adding a target never changes the pool.
    assert sorted(w["task"] for r, w in jobs if r == "target_decontamination") == sorted(TASKS)


def test_changing_proj_dim_recomputes_the_gradient_shards(tiny_run, datasets):
    every_shard = planned_jobs(run(tiny_run, datasets, "-n", "--forceall").stdout)["grads_pool_shard"]
    jobs = planned_jobs(run(tiny_run, datasets, "-n", config=("gradients={proj_dim: 128}",)).stdout)
    assert jobs["grads_pool_shard"] == every_shard >= yaml.safe_load(TINY.read_text())["gradients"]["n_shards"]
    assert "warmup_lora" not in jobs and "build_base_model" not in jobs


def test_tokenization_with_two_workers_under_snakemake_writes_the_same_tokens(tiny_run, datasets, tmp_path):
    # The tiny run tokenizes with one process (--max-threads 1); here Snakemake gives the rule 2 threads, so
    # tokenize_pool's spawn workers re-import the rule's script: it must not run again in them.
    workdir = tmp_path / "copy"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    tokens = "results/data/pool_tokens.arrow"
    run(workdir, datasets, "--cores", "2", "--forcerun", "tokenize_pool", targets=(tokens,))
    assert (workdir / tokens).read_bytes() == (tiny_run / tokens).read_bytes()
    assert "2 workers" in (workdir / "logs" / "tokenize_pool.log").read_text()


def test_wrong_config_key_and_missing_data_give_clear_errors(tiny_run, datasets, tmp_path):
    proc = run(tiny_run, datasets, "-n", config=("selection={betta: 1.0}",), check=False)
    assert proc.returncode != 0 and "'betta' was unexpected" in proc.stdout + proc.stderr
    missing = tmp_path / "no-datasets"
    # Offline (datasets_url: null), a missing dataset folder is an error naming it ...
    proc = run(tmp_path / "work", missing, "-n", config=("datasets_url=null",), check=False)
    assert proc.returncode != 0 and str(missing) in proc.stdout + proc.stderr
    # ... and with fetching on, its files are planned to be fetched into it.
    jobs = planned_jobs(run(tmp_path / "work", missing, "-n").stdout)
    assert jobs["fetch_dataset"] > 100 and jobs["build_pool"] == 1


def _all_outputs_readable(workdir: Path) -> None:
    from safetensors import safe_open

    for path in (workdir / "results").rglob("*"):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                list(handle.keys())


LIGHT = ("selection={methods: [clusterucb, random], sweep: [], oracle: false}", "quality={checkpoints: []}")
TWO_TARGETS = (*LIGHT, "target={tasks: [gsm8k, tydiqa]}")


def test_killed_run_resumes_with_rerun_incomplete_and_selects_the_same(tiny_run, datasets, tmp_path):
    workdir = tmp_path / "killed"
    command = snakemake_cmd(workdir, datasets, *CORES, config=TWO_TARGETS)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    target = workdir / "logs" / "grads_pool_shard" / "warmup"
    deadline = time.time() + 600
    try:
        while not (target.exists() and any(target.iterdir())):  # the gradient pass has started
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the gradient pass never started"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (workdir / "results/report/comparison.md").exists()
    _all_outputs_readable(workdir)  # nothing half-written under a final name
    run(workdir, datasets, "--unlock", config=TWO_TARGETS)  # SIGKILL (unlike SIGINT/SIGTERM) leaves the lock behind
    run(workdir, datasets, *CORES, "--rerun-incomplete", config=TWO_TARGETS)
    resumed, uninterrupted = selections(workdir), selections(tiny_run)
    assert set(resumed) == {
        f"results/runs/{task}/{run}/epoch-{e}/selection.parquet"
        for task, run, e in [(t, "full_matching", 1) for t in ("gsm8k", "tydiqa")]
        + [(t, "clusterucb", 2) for t in ("gsm8k", "tydiqa")]
        + [("all", "random", 1), ("all", "random", 2)]
    }
    assert resumed == {name: uninterrupted[name] for name in resumed}
    a = pq.read_table(workdir / "results/runs/gsm8k/clusterucb/epoch-2/draws.parquet").to_pandas()
    b = pq.read_table(tiny_run / "results/runs/gsm8k/clusterucb/epoch-2/draws.parquet").to_pandas()
    assert a.example_id.tolist() == b.example_id.tolist()

    # A third target added to the finished two-target run plans that target's jobs only (and the report's).
    assert planned_jobs(run(workdir, datasets, "-n", config=TWO_TARGETS).stdout) == {}
    jobs = planned_job_wildcards(run(workdir, datasets, "-n", config=(*LIGHT, "target={tasks: [gsm8k, tydiqa, mmlu]}")).stdout)
    assert jobs and all(w.get("task") == "mmlu" or rule in REPORT_RULES for rule, w in jobs), jobs  # not the shared random run either
    assert {"prepare_validation", "grads_val", "full_scores", "select_top_scores", "select_budgeted", "train_epoch", "evaluate"} <= {
        r for r, _ in jobs
    }


# Conda package names whose import name differs.
IMPORT_NAMES = {"pytorch": "torch", "pytorch-cpu": "torch", "matplotlib-base": "matplotlib", "pyyaml": "yaml", "faiss-cpu": "faiss"}

BLOCKER = """
import sys
from importlib.abc import MetaPathFinder

class NotInEnv(MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is not in {ENV}")

sys.meta_path.insert(0, NotInEnv())
sys.path[:0] = [REPO, REPO + "/workflow_scripts"]
"""


def env_modules(env_file: Path) -> set[str]:
    deps = []
    for dep in yaml.safe_load(env_file.read_text())["dependencies"]:
        deps += dep.get("pip", []) if isinstance(dep, dict) else [dep]
    names = {re.split(r"[\s<>=!]", dep.strip())[0] for dep in deps}
    return {IMPORT_NAMES.get(name, name.replace("-", "_")) for name in names}


def third_party_imports() -> set[str]:
    """Top-level packages imported anywhere in the library or the scripts (lazy imports included)."""
    names = set()
    for source in [*(REPO / "clusterucb").rglob("*.py"), *(REPO / "workflow_scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"clusterucb", "_common"}


def test_each_rule_script_imports_only_what_its_conda_env_declares():
    """What CI can check of ``--sdm conda`` without building the envs: a rule's script and the
    clusterucb modules it imports load with every package its env lacks made unimportable."""
    used = third_party_imports()
    assert {"torch", "transformers", "peft"} <= used
    pairs: dict[tuple[str, str], list[str]] = {}  # (script, env) -> the rules that run it
    for name, body in rule_blocks().items():
        env = re.search(r"conda:\s*\n\s*\"\.\./(envs/[\w.]+)\"", body)
        script = re.search(r"script:\s*\n\s*\"\.\./(workflow_scripts/\w+\.py)\"", body)
        if not script:
            continue
        assert env, f"rule {name} runs a script but declares no conda env"
        pairs.setdefault((script.group(1), env.group(1)), []).append(name)

    def load(script: str, env: str) -> subprocess.CompletedProcess:
        blocked = used - env_modules(REPO / env)
        tree = ast.parse((REPO / script).read_text())
        imports = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        code = f"REPO = {str(REPO)!r}\nBLOCKED = {sorted(blocked)!r}\nENV = {env!r}\n{BLOCKER}\n" + "\n".join(imports)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:  # each is one interpreter's imports
        loaded = dict(zip(pairs, pool.map(lambda pair: load(*pair), pairs)))
    for (script, env), proc in loaded.items():
        assert proc.returncode == 0, f"rules {pairs[script, env]} ({env}): {proc.stderr[-2000:]}"
    assert {env for _, env in pairs} == {"envs/cpu.yaml", "envs/torch.yaml"}


def test_pyproject_declares_every_package_the_code_imports():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {IMPORT_NAMES.get(n, n.replace("-", "_")) for n in (re.split(r"[\s<>=!\[]", d.strip())[0].lower() for d in deps)}
    assert third_party_imports() <= declared, third_party_imports() - declared


SMALL_REPLAY = [
    "demo.yaml",
    "smollm2.yaml",
    "smollm2-targets.yaml",
    "smollm2-quality.yaml",
    "smollm2-replay.yaml",
    "smollm2-replay-small.yaml",
]
# Each overlay with the layers its header names (the demo first where it builds on it).
OVERLAY_LAYERS = {
    "demo.yaml": ["demo.yaml"],
    "demo-replay.yaml": ["demo.yaml", "demo-replay.yaml"],
    "sweep.yaml": ["demo.yaml", "sweep.yaml"],
    "all-targets.yaml": ["demo.yaml", "all-targets.yaml"],
    "smollm2.yaml": ["demo.yaml", "smollm2.yaml"],
    "smollm2-targets.yaml": ["demo.yaml", "smollm2.yaml", "smollm2-targets.yaml"],
    "smollm2-quality.yaml": ["demo.yaml", "smollm2.yaml", "smollm2-targets.yaml", "smollm2-quality.yaml"],
    "smollm2-replay.yaml": ["demo.yaml", "smollm2.yaml", "smollm2-targets.yaml", "smollm2-quality.yaml", "smollm2-replay.yaml"],
    "smollm2-replay-small.yaml": SMALL_REPLAY,
    "smollm2-downstream.yaml": [*SMALL_REPLAY, "smollm2-downstream.yaml"],
}


def test_every_config_overlay_has_its_layers_listed():
    assert sorted(OVERLAY_LAYERS) == sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name != "paper.yaml")
    for overlay, layers in OVERLAY_LAYERS.items():
        header = (REPO / "configs" / overlay).read_text().split("\n\n", 1)[0]
        assert overlay == "demo.yaml" or " ".join(f"configs/{name}" for name in layers[:2]) in header, overlay


@pytest.mark.parametrize("overlay", sorted(OVERLAY_LAYERS))
def test_every_config_overlay_validates_and_plans(overlay, datasets, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            *(str(REPO / "configs" / name) for name in OVERLAY_LAYERS[overlay]),
            "--config",
            f"datasets_dir={datasets}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert planned_jobs(proc.stdout).get("compare_methods") == 1


def test_prior_knn_reselects_and_replays_on_the_tiny_run(tiny_run, datasets, tmp_path):
    """prior_knn end to end: its re-selection at the epoch-1 checkpoint (fresh gradients for its draws only) and
    its replay on that checkpoint's full scores, both reading the warmup features."""
    import numpy as np

    from clusterucb.selection.select import n_selected

    workdir = tmp_path / "copy"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    change = ("selection={methods: [prior_knn]}", "quality={grid: {method: [prior_knn, prior_rerank]}}")
    selection = "results/runs/gsm8k/prior_knn/epoch-2/selection.parquet"
    sweep = "results/quality/gsm8k/runs/full_matching/epoch-1/sweep.parquet"
    run(workdir, datasets, "--cores", "2", config=change, targets=(selection, sweep))
    draws = pq.read_table(workdir / "results/runs/gsm8k/prior_knn/epoch-2/draws.parquet").to_pandas()
    chosen = pq.read_table(workdir / selection).to_pandas()
    full = pq.read_table(workdir / "results/grads/runs/gsm8k/full_matching/epoch-1/scores/gsm8k.parquet").to_pandas()
    n_pool, budget, top_p = len(full), 0.3, 0.1  # the tiny config's
    assert len(draws) == int(n_pool * budget) and draws.example_id.is_unique and set(draws.phase) == {"prior_knn"}
    # Its rewards are the influence at that checkpoint, as the full pass computes it.
    fresh = full.set_index("example_id").score
    np.testing.assert_allclose(draws.score, fresh[draws.example_id].to_numpy(), rtol=1e-3, atol=1e-5)
    # The selection: the top-k of what it drew.
    k = len(chosen)
    assert k == n_selected(n_pool, top_p)
    assert set(chosen.example_id) == set(draws.nlargest(k, "score").example_id)
    replay = pq.read_table(workdir / sweep).to_pandas()
    rows = replay[replay.method == "prior_knn"]
    assert sorted(rows.budget.unique()) == [0.2, 0.4] and (rows.n_gradients == (rows.budget * n_pool).astype(int)).all()
    assert rows.seed.isna().all() and rows.Rs.between(0, 1).all()


def test_a_training_seed_keeps_the_warmups_lora_init(tiny_run, datasets, tmp_path):
    """A training seed changes the data order and dropout, not the LoRA's initial A matrices (the warmup's): the
    prior methods compare warmup features with gradients at the run's checkpoints, which needs the same A."""
    import torch
    from safetensors.torch import load_file

    workdir = tmp_path / "copy"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    adapter = "results/runs/gsm8k/{run}/epoch-1/adapter/adapter_model.safetensors"
    run(workdir, datasets, "--cores", "2", config=("train={seeds: [8]}",), targets=(adapter.format(run="full_matching__train_seed-8"),))
    master = load_file(workdir / adapter.format(run="full_matching"))
    seeded = load_file(workdir / adapter.format(run="full_matching__train_seed-8"))
    cosine = {
        name: torch.nn.functional.cosine_similarity(master[name].flatten().double(), seeded[name].flatten().double(), dim=0).item()
        for name in master
    }
    a_matrices = [c for name, c in cosine.items() if "lora_A" in name]
    b_matrices = [c for name, c in cosine.items() if "lora_B" in name]
    assert a_matrices and min(a_matrices) > 0.99, a_matrices  # the same start, a few steps apart
    assert any(not torch.equal(master[name], seeded[name]) for name in master)  # yet trained otherwise
    assert min(b_matrices) < 0.999, b_matrices
