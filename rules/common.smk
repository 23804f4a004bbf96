# Helpers only (no rules): config validation, path scheme, and the get_* functions
# that rules use for inputs, params and resources.

import glob
import os
import sys

import yaml

from snakemake.utils import min_version, validate

min_version("9.0")


def coerce_cli_values(value, schema):
    """Turn strings into the numbers/booleans the schema asks for.

    `--config selection='{beta: 2.0}'` reaches Snakemake's YAML BaseLoader, which
    keeps nested values as strings; top-level values are already typed.
    """
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            value[key] = coerce_cli_values(item, sub)
        return value
    if isinstance(value, list):
        return [coerce_cli_values(v, schema.get("items", {})) for v in value]
    if isinstance(value, str):
        types = schema.get("type", [])
        types = [types] if isinstance(types, str) else types
        if "null" in types and value in ("null", "~", ""):
            return None
        for kind, convert in (("integer", int), ("number", float)):
            if kind in types:
                try:
                    return convert(value)
                except ValueError:
                    pass
        if "boolean" in types and value.lower() in ("true", "false"):
            return value.lower() == "true"
    return value


sys.path.insert(0, workflow.basedir)  # the clusterucb package, installed or not
from clusterucb.io import scratch_dir_for  # noqa: E402
from clusterucb.runs import BUDGETED, SHARED_EPOCH1, defaults_from_config, expand_runs  # noqa: E402

with open(workflow.source_path("../config.schema.yaml")) as schema_file:
    coerce_cli_values(config, yaml.safe_load(schema_file))
validate(config, schema="../config.schema.yaml")

BUILTIN_MODEL = "builtin-tiny"
EPOCHS = int(config["train"]["epochs"])
N_SHARDS = int(config["gradients"]["n_shards"])
SELECTION = config["selection"]
try:
    RUNS = expand_runs(
        SELECTION["methods"],
        SELECTION["sweep"],
        defaults_from_config(SELECTION, config["cluster"]["k"], config["seed"]),
    )
except ValueError as err:
    raise WorkflowError(f"config key 'selection': {err}")
BUDGETED_RUNS = [name for name, run in RUNS.items() if run.method in BUDGETED]
QUALITY = config["quality"]
LESS_CKPTS = [f"less/ckpt-{i}" for i in range(1, config["less"]["warmup_epochs"] + 1)]


wildcard_constraints:
    epoch=r"\d+",
    shard=r"\d+",
    k=r"\d+",
    run=r"[A-Za-z0-9_.\-]+",
    ckpt=r"warmup|less/ckpt-\d+|runs/[A-Za-z0-9_.\-]+/epoch-\d+",


# ---------------------------------------------------------------- base model


def model_is_built():
    """The workflow builds the base model itself (built-in tiny) or converts it (GGUF)."""
    return config["model"] == BUILTIN_MODEL or config["model"].endswith(".gguf")


def get_base_model():
    """The file that stands for the base model: built weights, or the user's model directory."""
    if model_is_built():
        return "results/model/base/model.safetensors"
    if not os.path.isdir(config["model"]):
        raise WorkflowError(
            f"config key 'model': {config['model']!r} is not '{BUILTIN_MODEL}', a .gguf file or an existing model directory"
        )
    return config["model"]


def get_builtin_sizes():
    return {k: v for k, v in config["model_builtin"].items() if k != "pretrain"}


# ---------------------------------------------------------------- data


def get_datasets_dir(wildcards=None):
    return config["datasets_dir"]


def datasets_path(relative):
    return os.path.join(config["datasets_dir"], relative)


def get_source_files(wildcards=None):
    """Every staged file the pool reads (glob patterns expanded), so a missing one is reported by name."""
    files = []
    for name, source in config["data"]["sources"].items():
        for pattern in source["files"]:
            path = datasets_path(pattern)
            if any(ch in pattern for ch in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise WorkflowError(
                        f"data.sources.{name}: no file matches {path} (is datasets_dir set right?)"
                    )
                files.extend(matches)
            else:
                files.append(path)
    return files


def get_gsm8k_files(wildcards=None):
    return {
        "train": datasets_path("gsm8k/train.jsonl.gz"),
        "test": datasets_path("gsm8k/test.jsonl"),
    }


# ---------------------------------------------------------------- runs and checkpoints


def get_run(wildcards):
    if wildcards.run not in RUNS:
        raise WorkflowError(f"unknown run {wildcards.run!r}; configured runs: {sorted(RUNS)}")
    return RUNS[wildcards.run]


def checkpoint_files(ckpt):
    """Adapter and optimizer state of a checkpoint ('warmup', 'less/ckpt-<i>' or 'runs/<run>/epoch-<e>')."""
    return {
        "adapter": f"results/{ckpt}/adapter/adapter_model.safetensors",
        "adapter_config": f"results/{ckpt}/adapter/adapter_config.json",
        "optimizer": f"results/{ckpt}/optimizer.safetensors",
    }


def val_grads(ckpt):
    return {
        "val_tensors": f"results/grads/{ckpt}/val.safetensors",
        "val_index": f"results/grads/{ckpt}/val.parquet",
    }


def assignments(k):
    return f"results/cluster/k-{k}/assignments.parquet"


def get_checkpoint(wildcards):
    return checkpoint_files(wildcards.ckpt)


def get_pool_shards(wildcards):
    return {
        "tensors": expand(
            "results/grads/{ckpt}/pool/shard-{shard}.safetensors",
            ckpt=wildcards.ckpt,
            shard=range(N_SHARDS),
        ),
        "indexes": expand(
            "results/grads/{ckpt}/pool/shard-{shard}.parquet",
            ckpt=wildcards.ckpt,
            shard=range(N_SHARDS),
        ),
    }


def get_pool_shard_tensors(wildcards):
    return get_pool_shards(wildcards)["tensors"]


def get_warmup_shards(wildcards=None):
    return expand("results/grads/warmup/pool/shard-{shard}.safetensors", shard=range(N_SHARDS))


def get_full_scores_inputs(wildcards):
    return {
        "manifest": f"results/grads/{wildcards.ckpt}/pool/manifest.parquet",
        **val_grads(wildcards.ckpt),
    }


def get_top_scores_input(wildcards):
    """Full matching: the shared epoch 1 at the warmup checkpoint; dynamic at its previous epoch's."""
    if wildcards.run == SHARED_EPOCH1:
        if int(wildcards.epoch) != 1:
            raise WorkflowError(f"{SHARED_EPOCH1} has only epoch 1")
        return "results/grads/warmup/scores.parquet"
    return f"results/grads/{RUNS['dynamic'].checkpoint(int(wildcards.epoch) - 1)}/scores.parquet"


def get_budgeted_inputs(wildcards):
    """The previous epoch's checkpoint of the run, its validation gradients there, and the run's clusters."""
    run = get_run(wildcards)
    previous = run.checkpoint(int(wildcards.epoch) - 1)
    return {
        **checkpoint_files(previous),
        **val_grads(previous),
        "assignments": assignments(run.params.get("k", config["cluster"]["k"])),
    }


def get_run_params(wildcards):
    run = get_run(wildcards)
    return {"method": run.method, **run.params}


def get_random_seed(wildcards):
    return RUNS[wildcards.run].params["seed"] if wildcards.run in RUNS else config["seed"]


def get_less_scores(wildcards=None):
    return expand("results/grads/{ckpt}/scores.parquet", ckpt=LESS_CKPTS)


def get_less_outputs(kind):
    return expand(f"results/{{ckpt}}/{kind}", ckpt=LESS_CKPTS)


def get_train_inputs(wildcards):
    """The epoch's selection, plus the previous epoch's adapter and optimizer state after epoch 1."""
    inputs = {
        "selection": f"results/runs/{wildcards.run}/epoch-{wildcards.epoch}/selection.parquet"
    }
    epoch = int(wildcards.epoch)
    if epoch > 1:
        previous = get_run(wildcards).checkpoint(epoch - 1)
        inputs.update({f"prev_{k}": v for k, v in checkpoint_files(previous).items()})
    return inputs


def get_recall_inputs(wildcards):
    """Oracle: full-pool scores at the checkpoint the run selected at, with the run's selection and draws."""
    run = get_run(wildcards)
    epoch = int(wildcards.epoch)
    return {
        "selection": f"results/runs/{run.name}/epoch-{epoch}/selection.parquet",
        "draws": f"results/runs/{run.name}/epoch-{epoch}/draws.parquet",
        "scores": f"results/grads/{run.checkpoint(epoch - 1)}/scores.parquet",
        "assignments": assignments(run.params.get("k", config["cluster"]["k"])),
    }


# ---------------------------------------------------------------- params


def get_grad_params(wildcards=None):
    """Everything that defines the gradient feature space; a change re-runs the gradient jobs."""
    keys = (
        "projector",
        "proj_dim",
        "proj_seed",
        "sjlt_c",
        "dtype",
        "adam_eps_inside_sqrt",
        "max_batch_size",
        "max_batch_tokens",
        "resume_chunk",
    )
    return {k: config["gradients"][k] for k in keys}


def get_train_params(wildcards=None):
    return dict(config["train"])


def get_eval_params(wildcards=None):
    target = config["target"]
    return {
        "n_shot": target["n_shot"],
        "max_new_tokens": target["max_new_tokens"],
        "batch_size": target["eval_batch_size"],
        "max_length": config["data"]["val_max_length"],
    }


def get_eval_adapter(wildcards):
    """The last epoch's adapter; the base model is evaluated without one."""
    if wildcards.run == "base":
        return []
    return checkpoint_files(get_run(wildcards).checkpoint(EPOCHS))["adapter"]


def get_scratch(wildcards, output):
    """Resumable in-job state: beside, not inside, the declared outputs; one folder per job."""
    return str(scratch_dir_for(output[0]))


def get_quality_grid(wildcards=None):
    return QUALITY["grid"]


def get_quality_inputs(wildcards):
    ks = sorted(set(QUALITY["grid"].get("k") or [config["cluster"]["k"]]))
    return {
        "scores": f"results/grads/{wildcards.ckpt}/scores.parquet",
        "assignments": [assignments(k) for k in ks],
    }


# ---------------------------------------------------------------- resources


def mem_mb_heavy(wildcards, attempt):
    return 8000 * attempt


def runtime_heavy(wildcards, attempt):
    return 120 * attempt


# ---------------------------------------------------------------- targets


def selection_files(run):
    return [f"results/{RUNS[run].checkpoint(e)}/selection.parquet" for e in range(1, EPOCHS + 1)]


def recall_files(run):
    if not SELECTION["oracle"] or RUNS[run].method not in BUDGETED:
        return []
    return [f"results/runs/{run}/epoch-{e}/recall.json" for e in range(2, EPOCHS + 1)]


def draws_files(run):
    if RUNS[run].method not in BUDGETED:
        return []
    return [f"results/runs/{run}/epoch-{e}/draws.parquet" for e in range(2, EPOCHS + 1)]


def get_compare_inputs(wildcards=None):
    return {
        "metrics": expand("results/eval/{run}/metrics.json", run=["base", *RUNS]),
        "selections": [f for run in RUNS for f in selection_files(run)],
        "recalls": [f for run in RUNS for f in recall_files(run)],
    }


def get_compare_params(wildcards=None):
    return {
        "runs": {name: {"method": run.method, **run.params} for name, run in RUNS.items()},
        "selections": {run: selection_files(run) for run in RUNS},
        "recalls": {run: recall_files(run) for run in RUNS},
    }


def get_quality_tables(wildcards=None):
    return expand("results/quality/{ckpt}/sweep.parquet", ckpt=QUALITY["checkpoints"])


def get_all_draws(wildcards=None):
    return [f for run in BUDGETED_RUNS for f in draws_files(run)]


def get_arm_pull_plots():
    if not SELECTION["oracle"] or EPOCHS < 2:
        return []
    return expand("results/report/figures/arm_pulls/{run}.png", run=BUDGETED_RUNS)


def get_arm_inputs(wildcards):
    return [f"results/runs/{wildcards.run}/epoch-{e}/arms.parquet" for e in range(2, EPOCHS + 1)]


def get_final_outputs():
    outputs = [
        "results/report/comparison.md",
        "results/report/comparison.parquet",
        "results/report/config.yaml",
        "results/report/figures/cluster_influence.png",
        *get_arm_pull_plots(),
    ]
    if QUALITY["checkpoints"]:
        outputs += ["results/report/quality.md", "results/report/figures/recall_vs_budget.png"]
    if get_all_draws():
        outputs.append("results/report/figures/cumulative_reward.png")
    return outputs
