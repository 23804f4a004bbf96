# Helpers only (no rules): config validation, path scheme, and the get_* functions
# that rules use for inputs, params and resources.

import glob
import os

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


with open(workflow.source_path("../config.schema.yaml")) as schema_file:
    coerce_cli_values(config, yaml.safe_load(schema_file))
validate(config, schema="../config.schema.yaml")

BUILTIN_MODEL = "builtin-tiny"
EPOCHS = int(config["train"]["epochs"])
METHODS = list(config["selection"]["methods"])
N_SHARDS = int(config["gradients"]["n_shards"])


wildcard_constraints:
    epoch=r"\d+",
    shard=r"\d+",
    method=r"[A-Za-z0-9_]+",
    ckpt=r"warmup|runs/[A-Za-z0-9_]+/epoch-\d+",


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


def get_model_name():
    """The model's identity recorded in every artefact's metadata."""
    return config["model"]


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


# ---------------------------------------------------------------- checkpoints


def checkpoint_files(ckpt):
    """Adapter and optimizer state of a checkpoint ('warmup' or 'runs/<method>/epoch-<e>')."""
    return {
        "adapter": f"results/{ckpt}/adapter/adapter_model.safetensors",
        "adapter_config": f"results/{ckpt}/adapter/adapter_config.json",
        "optimizer": f"results/{ckpt}/optimizer.safetensors",
    }


def get_checkpoint(wildcards):
    return checkpoint_files(wildcards.ckpt)


def get_warmup_checkpoint(wildcards):
    return checkpoint_files("warmup")


def get_previous_checkpoint(wildcards):
    """The checkpoint ClusterUCB selects at for epoch e: the end of epoch e - 1 of the same run."""
    return checkpoint_files(f"runs/{wildcards.method}/epoch-{int(wildcards.epoch) - 1}")


def get_previous_val_grads(wildcards):
    ckpt = f"runs/{wildcards.method}/epoch-{int(wildcards.epoch) - 1}"
    return {
        "val_tensors": f"results/grads/{ckpt}/val.safetensors",
        "val_index": f"results/grads/{ckpt}/val.parquet",
    }


def get_train_inputs(wildcards):
    """Selection of the epoch, plus the previous epoch's adapter and optimizer state after epoch 1."""
    inputs = {
        "selection": f"results/runs/{wildcards.method}/epoch-{wildcards.epoch}/selection.parquet"
    }
    if int(wildcards.epoch) > 1:
        previous = checkpoint_files(f"runs/{wildcards.method}/epoch-{int(wildcards.epoch) - 1}")
        inputs.update({f"prev_{k}": v for k, v in previous.items()})
    return inputs


def get_pool_shards(wildcards=None):
    return {
        "tensors": expand(
            "results/grads/warmup/pool/shard-{shard}.safetensors", shard=range(N_SHARDS)
        ),
        "indexes": expand("results/grads/warmup/pool/shard-{shard}.parquet", shard=range(N_SHARDS)),
    }


# ---------------------------------------------------------------- params


def get_grad_params(wildcards=None):
    """Everything that defines the gradient feature space; a change re-runs the gradient jobs."""
    keys = (
        "projector",
        "proj_dim",
        "proj_seed",
        "dtype",
        "adam_eps_inside_sqrt",
        "max_batch_size",
        "max_batch_tokens",
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
    if wildcards.method == "base":
        return []
    return checkpoint_files(f"runs/{wildcards.method}/epoch-{EPOCHS}")["adapter"]


def get_scratch(wildcards, output):
    """Resumable in-job state lives beside, not inside, the declared outputs."""
    return os.path.join(
        "results", "scratch", os.path.relpath(os.path.dirname(output[0]), "results")
    )


# ---------------------------------------------------------------- resources


def mem_mb_heavy(wildcards, attempt):
    return 8000 * attempt


def runtime_heavy(wildcards, attempt):
    return 120 * attempt


# ---------------------------------------------------------------- targets


def get_selection_files(method):
    return expand(
        "results/runs/{method}/epoch-{epoch}/selection.parquet",
        method=method,
        epoch=range(1, EPOCHS + 1),
    )


def get_compare_inputs(wildcards=None):
    methods = ["base"] + METHODS
    return {
        "metrics": expand("results/eval/{method}/metrics.json", method=methods),
        "selections": [f for m in METHODS for f in get_selection_files(m)],
    }


def get_selection_map(wildcards=None):
    return {m: get_selection_files(m) for m in METHODS}


def get_compare_methods(wildcards=None):
    return ["base"] + METHODS


def get_final_outputs():
    return [
        "results/report/comparison.md",
        "results/report/comparison.parquet",
        "results/report/config.yaml",
    ]
