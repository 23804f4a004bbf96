# Helpers only (no rules): config validation, path scheme, and the get_* functions
# that rules use for inputs, params and resources.

import fnmatch
import glob
import math
import os
import re
import sys

import yaml

from snakemake.utils import min_version, validate

min_version("9.0")


def coerce_cli_values(value, schema, root=None):
    """Turn strings into the numbers/booleans the schema asks for.

    `--config selection='{beta: 2.0}'` reaches Snakemake's YAML BaseLoader, which
    keeps nested values as strings; top-level values are already typed. Follows
    `$ref` and the branches of `oneOf`/`anyOf` (a task's settings, its sampling).
    """
    root = schema if root is None else root
    if "$ref" in schema:
        schema = root["$defs"][os.path.basename(schema["$ref"])]
    branches = schema.get("oneOf") or schema.get("anyOf")
    if branches:
        kinds = {dict: "object", list: "array"}
        for branch in branches:
            branch = root["$defs"][os.path.basename(branch["$ref"])] if "$ref" in branch else branch
            wanted = kinds.get(type(value))
            if wanted and branch.get("type") != wanted:
                continue
            converted = coerce_cli_values(value, branch, root)
            if wanted or converted is not value:
                return converted
        return value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            value[key] = coerce_cli_values(item, sub, root)
        return value
    if isinstance(value, list):
        return [coerce_cli_values(v, schema.get("items", {}), root) for v in value]
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
from clusterucb.infra import paths  # noqa: E402
from clusterucb.infra.config_layers import layer_files, layered_config  # noqa: E402
from clusterucb.data.remote import read_manifest  # noqa: E402
from clusterucb.models.hub import hub_model_dir, parse_hub_id  # noqa: E402
from clusterucb.infra.io import scratch_dir_for  # noqa: E402
from clusterucb.infra.resources import (  # noqa: E402
    DTYPE_BYTES,
    RUNTIME_MB,
    ModelShape,
    evaluate_job_mb,
    evaluation_batch,
    features_mb,
    format_gpu_plan,
    gpu_plan,
    kmeans_job_mb,
    model_job_mb,
)
from clusterucb.data.tokens import count_rows  # noqa: E402
from clusterucb.selection.runs import (
    BUDGETED,
    FEATURE_METHODS,
    GUIDANCE_OFF,
    METHODS,
    PRIOR_METHODS,
    defaults_from_config,
    epoch1_runs,
    expand_runs,
)  # noqa: E402
from clusterucb.tasks import get_task, resolve_settings, task_names  # noqa: E402
from clusterucb.infra.throughput import result_config  # noqa: E402

# The config, layer by layer (clusterucb/infra/config_layers.py): config.yaml's defaults, then the --configfile
# files (or, when none is given, the embedded demo configs/demo.yaml), then --config. Rebuilt from the
# files rather than taken from Snakemake's merge, so that a user's data.sources replaces the defaults'
# instead of being added to them. Jobs Snakemake spawns get the same files and --config: the same config.
CONFIG_FILES = layer_files(workflow.basedir, workflow.config_settings.configfiles)
try:
    LAYERED = layered_config(
        workflow.basedir, workflow.config_settings.configfiles, workflow.config_settings.config
    )
except ValueError as err:
    raise WorkflowError(str(err))
config.clear()
config.update(LAYERED)
with open(workflow.source_path("../config.schema.yaml")) as schema_file:
    coerce_cli_values(config, yaml.safe_load(schema_file))
if not (config.get("data") or {}).get("sources"):
    raise WorkflowError(
        "config key 'data.sources' is empty: name your pool's files in an overlay, e.g. "
        "data: {sources: {mine: {format: messages, files: [/path/to/pool.jsonl]}}} "
        f"(config files read: {', '.join(map(str, CONFIG_FILES))}; README, 'Select data for your own model')"
    )
validate(config, schema="../config.schema.yaml")

BUILTIN_MODEL = "builtin-tiny"
MODEL = config["model"]  # None until a config names one: only the jobs that load the model need it
# (repo, revision) when the model is a hub id, else None
HUB_MODEL = parse_hub_id(MODEL) if MODEL else None
REMOTE = read_manifest()  # dataset files fetchable from their public sources
EPOCHS = int(config["train"]["epochs"])
N_SHARDS = int(config["gradients"]["n_shards"])
SELECTION = config["selection"]
TARGET = config["target"]
TASKS = list(TARGET["tasks"])
DECONTAMINATE = list(config["data"]["decontaminate_against"] or task_names())
try:
    RUNS = expand_runs(
        SELECTION["methods"],
        SELECTION["sweep"],
        defaults_from_config(SELECTION, config["cluster"]["k"], config["seed"]),
        config["train"]["seeds"],
    )
except ValueError as err:
    raise WorkflowError(f"config key 'selection': {err}")
# The shared epoch-1 runs (full matching at the warmup), one per training seed, with their seeds.
EPOCH1_RUNS = epoch1_runs(RUNS, config["seed"])
BUDGETED_RUNS = [name for name, run in RUNS.items() if run.method in BUDGETED]
QUALITY = config["quality"]
LESS_CKPTS = [f"less/ckpt-{i}" for i in range(1, config["less"]["warmup_epochs"] + 1)]


def resolved_task_settings():
    """Every target's settings: the task's defaults (the paper's) with the config's overrides."""
    unknown = sorted(set(TARGET["settings"]) - set(task_names()))
    if unknown:
        raise WorkflowError(f"config key 'target.settings': unknown task(s) {unknown}")
    missing = sorted(set(TASKS) - set(DECONTAMINATE))
    if missing:
        raise WorkflowError(
            f"config key 'data.decontaminate_against' lacks the target task(s) {missing}: the pool would keep their test questions"
        )
    settings = {}
    for task in TASKS:
        try:
            settings[task] = resolve_settings(get_task(task), TARGET["settings"].get(task))
        except ValueError as err:
            raise WorkflowError(f"config key 'target.settings.{task}': {err}")
    return settings


TASK_SETTINGS = resolved_task_settings()


def alternatives(names):
    return "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))


NO_RUN = r"(?!)"  # a constraint nothing matches: no configured run of that kind


def runs_pattern(methods, extra=()):
    """The configured run names of ``methods``, from the run registry: the rule that selects for a
    method takes exactly its runs (no regex copying the naming grammar of clusterucb/selection/runs.py).
    """
    names = [name for name, run in RUNS.items() if run.method in methods] + list(extra)
    return alternatives(names) if names else NO_RUN


TASK_PATTERN = alternatives([*task_names(), paths.ALL_TASKS])
RUN_PATTERN = r"[A-Za-z0-9_.\-]+"


wildcard_constraints:
    epoch=r"\d+",
    shard=r"\d+",
    k=r"\d+",
    task=TASK_PATTERN,
    run=RUN_PATTERN,
    ckpt=rf"warmup|less/ckpt-\d+|runs/({TASK_PATTERN})/{RUN_PATTERN}/epoch-\d+",
    qckpt=rf"warmup|less/ckpt-\d+|runs/{RUN_PATTERN}/epoch-\d+",


# ---------------------------------------------------------------- base model


def model_is_built():
    """The workflow builds the base model itself (built-in tiny) or converts it (GGUF)."""
    return MODEL == BUILTIN_MODEL or (MODEL or "").endswith(".gguf")


def get_base_model(wildcards=None):
    """The file that stands for the base model: built weights, a fetched hub model's config, or the user's directory.

    An input function of the rules that load the model, so a config without a model still builds its pool.
    """
    if not MODEL:
        raise WorkflowError(
            "config key 'model' is not set: name a Hugging Face hub id (org/name[@revision]), a local model "
            f"directory, a .gguf file or '{BUILTIN_MODEL}'"
        )
    if model_is_built():
        return paths.BASE_WEIGHTS
    if HUB_MODEL:
        return f"{hub_model_dir(*HUB_MODEL)}/config.json"
    if not os.path.isdir(MODEL):
        raise WorkflowError(
            f"config key 'model': {MODEL!r} is not '{BUILTIN_MODEL}', a .gguf file, an existing model "
            "directory or a Hugging Face hub id (org/name[@revision])"
        )
    return MODEL


def get_builtin_sizes():
    return {k: v for k, v in config["model_builtin"].items() if k != "pretrain"}


# ---------------------------------------------------------------- data


def get_datasets_dir(wildcards=None):
    return config["datasets_dir"]


def datasets_path(relative):
    return os.path.join(config["datasets_dir"], relative)


def expand_pattern(pattern, what):
    """A staged file, or the sorted matches of a glob pattern (none is an error naming the pattern).

    A pattern matches the files datasets_dir holds and, when fetching is on, the files of the remote
    manifest (fetched by rule fetch_dataset when missing).
    """
    path = datasets_path(pattern)
    if not any(ch in pattern for ch in "*?["):
        return [path]
    matches = set(glob.glob(path))
    if config["datasets_url"]:
        matches |= {datasets_path(p) for p in REMOTE if fnmatch.fnmatch(p, pattern)}
    if not matches:
        raise WorkflowError(f"{what}: no file matches {path} (is datasets_dir set right?)")
    return sorted(matches)


def remote_files_pattern():
    """The dataset files fetch_dataset makes: the remote manifest's paths that datasets_dir lacks (none when
    datasets_url is null). A file the folder holds is a plain input, not a rule's output: Snakemake then has
    no provenance to miss for it (no "missing provenance/metadata" warning for a mirror's files)."""
    if not config["datasets_url"]:
        return "(?!)"  # matches nothing: a missing file is reported as missing input
    missing = [p for p in sorted(REMOTE) if not os.path.exists(datasets_path(p))]
    return "|".join(re.escape(p) for p in missing) or "(?!)"


def get_source_files(wildcards=None):
    """Every staged file the pool reads (glob patterns expanded), so a missing one is reported by name."""
    return [
        f
        for name, source in config["data"]["sources"].items()
        for pattern in source["files"]
        for f in expand_pattern(pattern, f"data.sources.{name}")
    ]


def get_task_files(wildcards):
    """The staged files a target task reads, by role (its module's data_files())."""
    task = get_task(wildcards.task)
    return {
        role: expand_pattern(pattern, f"target task {task.name}")
        for role, pattern in task.data_files().items()
    }


def get_decontamination_files(wildcards=None):
    return [paths.TARGET_DECONTAM.format(task=task) for task in DECONTAMINATE]


def get_validation_settings(wildcards):
    """The settings a task's validation set reads (n_val): evaluation knobs do not rebuild it."""
    settings = TASK_SETTINGS[wildcards.task].as_dict()
    return {k: settings[k] for k in sorted(get_task(wildcards.task).validation_settings)}


def get_test_settings(wildcards):
    """The settings a task's test set reads (its caps)."""
    settings = TASK_SETTINGS[wildcards.task].as_dict()
    return {k: settings[k] for k in sorted(get_task(wildcards.task).test_settings)}


# ---------------------------------------------------------------- runs and checkpoints


def get_run(wildcards):
    if wildcards.run not in RUNS:
        raise WorkflowError(f"unknown run {wildcards.run!r}; configured runs: {sorted(RUNS)}")
    return RUNS[wildcards.run]


def val_grads(ckpt, task):
    return {
        "val_tensors": paths.VAL_GRADS.format(ckpt=ckpt, task=task),
        "val_index": paths.VAL_GRADS_INDEX.format(ckpt=ckpt, task=task),
        "val_tokens": paths.TARGET_VAL_TOKENS.format(task=task),
    }


def assignments(k):
    return paths.ASSIGNMENTS.format(k=k)


def run_k(run):
    return run.params.get("k", config["cluster"]["k"])


def get_checkpoint(wildcards):
    return paths.checkpoint_files(wildcards.ckpt)


def pool_shards(ckpt):
    return {
        "tensors": [paths.POOL_SHARD.format(ckpt=ckpt, shard=s) for s in range(N_SHARDS)],
        "indexes": [paths.POOL_SHARD_INDEX.format(ckpt=ckpt, shard=s) for s in range(N_SHARDS)],
    }


def get_pool_shards(wildcards):
    return pool_shards(wildcards.ckpt)


def get_pool_shard_tensors(wildcards):
    return pool_shards(wildcards.ckpt)["tensors"]


def get_warmup_shards(wildcards=None):
    return pool_shards("warmup")["tensors"]


def get_full_scores_inputs(wildcards):
    return {
        "manifest": paths.POOL_MANIFEST.format(ckpt=wildcards.ckpt),
        **val_grads(wildcards.ckpt, wildcards.task),
    }


def get_top_scores_input(wildcards):
    """Full matching: a shared epoch 1 at the warmup checkpoint; dynamic at its previous epoch's."""
    if wildcards.run in EPOCH1_RUNS:
        if int(wildcards.epoch) != 1:
            raise WorkflowError(f"{wildcards.run} has only epoch 1")
        ckpt = "warmup"
    else:
        ckpt = get_run(wildcards).checkpoint(wildcards.task, int(wildcards.epoch) - 1)
    return paths.SCORES.format(ckpt=ckpt, task=wildcards.task)


def get_budgeted_inputs(wildcards):
    """The previous epoch's checkpoint of the run, its validation gradients there, and its arms: the run's
    clusters for ClusterUCB; for random_draw (one arm) only which samples are clusterable, so K does not rerun it.
    """
    run = get_run(wildcards)
    previous = run.checkpoint(wildcards.task, int(wildcards.epoch) - 1)
    if run.method == "clusterucb":
        arms = assignments(run_k(run))
    else:
        arms = paths.POOL_MANIFEST.format(ckpt="warmup")
    inputs = {
        **paths.checkpoint_files(previous),
        **val_grads(previous, wildcards.task),
        "arms": arms,
    }
    if needs_prior(run):
        inputs["prior"] = prior_scores(previous, wildcards.task)
    # prior_knn reads the warmup features (who is whose neighbour); arms is their manifest.
    if run.method in FEATURE_METHODS:
        inputs["warmup_shards"] = get_warmup_shards()
    return inputs


def needs_prior(run):
    """prior_rerank, prior_knn, and ClusterUCB with any prior guidance (its params hold only switches that are on)."""
    return run.method in PRIOR_METHODS or bool(set(run.params) & set(GUIDANCE_OFF))


def prior_scores(ckpt, task):
    """The prior at a checkpoint: warmup features against its validation gradients (at the warmup: its scores)."""
    return (
        paths.SCORES.format(ckpt=ckpt, task=task)
        if ckpt == "warmup"
        else paths.PRIOR_SCORES.format(ckpt=ckpt, task=task)
    )


def get_prior_scores_inputs(wildcards):
    """The warmup store (features, shards) and the checkpoint's validation gradients."""
    return {
        "manifest": paths.POOL_MANIFEST.format(ckpt="warmup"),
        "shards": get_warmup_shards(),
        **val_grads(wildcards.ckpt, wildcards.task),
    }


def get_static_input(wildcards):
    """Static keeps epoch 1's selection: the target's shared full matching (the same for every training seed)."""
    return paths.SELECTION.format(task=wildcards.task, run=get_run(wildcards).epoch1, epoch=1)


def get_run_params(wildcards):
    run = get_run(wildcards)
    return {"method": run.method, **run.params}


def get_random_seed(wildcards):
    return RUNS[wildcards.run].params["seed"] if wildcards.run in RUNS else config["seed"]


def get_train_seed(wildcards):
    """The run's training seed (data order, LoRA init, dropout); a shared epoch 1's is in its name."""
    if wildcards.run in EPOCH1_RUNS:
        return EPOCH1_RUNS[wildcards.run]
    return get_run(wildcards).train_seed


def get_less_scores(wildcards):
    return [paths.SCORES.format(ckpt=ckpt, task=wildcards.task) for ckpt in LESS_CKPTS]


def get_less_outputs(kind):
    return [getattr(paths, kind).format(ckpt=ckpt) for ckpt in LESS_CKPTS]


def get_train_inputs(wildcards):
    """The epoch's selection, plus the previous epoch's adapter and optimizer state after epoch 1."""
    inputs = {"selection": paths.SELECTION.format(**wildcards)}
    epoch = int(wildcards.epoch)
    if epoch > 1:
        previous = get_run(wildcards).checkpoint(wildcards.task, epoch - 1)
        inputs.update({f"prev_{k}": v for k, v in paths.checkpoint_files(previous).items()})
    return inputs


def get_recall_inputs(wildcards):
    """Oracle: full-pool scores at the checkpoint the run selected at, with the run's selection and draws."""
    run = get_run(wildcards)
    epoch = int(wildcards.epoch)
    return {
        "selection": paths.SELECTION.format(**wildcards),
        "draws": paths.DRAWS.format(**wildcards),
        "scores": paths.SCORES.format(
            ckpt=run.checkpoint(wildcards.task, epoch - 1), task=wildcards.task
        ),
        "assignments": assignments(run_k(run)),
    }


# ---------------------------------------------------------------- params


def get_grad_params(wildcards=None):
    """Everything that defines the gradient feature space; a change re-runs the gradient jobs.
    Batch sizes and the resume chunk only change how the work is cut (rounding, not results):
    the scripts read them from the config (workflow_scripts/_common.throughput), so lowering a
    batch size to fit memory recomputes nothing."""
    keys = ["projector", "proj_dim", "proj_seed", "dtype", "adam_eps_inside_sqrt"]
    if config["gradients"]["projector"] == "sjlt":  # the dense projector has no sjlt_c
        keys.append("sjlt_c")
    return {
        **{k: config["gradients"][k] for k in keys},
        "base_dtype": config["precision"]["base_dtype"],
    }


def get_train_params(wildcards=None):
    """Training settings, less micro_batch: the scripts read it from the config (a memory knob:
    dropout masks are keyed per example, clusterucb/training/dropout.py), so lowering it reruns nothing;
    and less the list of extra training seeds (each run's own seed is its ``seed`` param).
    """
    train = {k: v for k, v in config["train"].items() if k not in ("micro_batch", "seeds")}
    return {**train, "base_dtype": config["precision"]["base_dtype"]}


def get_eval_params(wildcards):
    """What the evaluation of a task reads: its settings, the chat template and the target-loss length."""
    return {
        "settings": TASK_SETTINGS[wildcards.task].as_dict(),
        "chat_template": config["data"]["chat_template"],
        "max_length": config["data"]["val_max_length"],
        "seed": config["seed"],
        "base_dtype": config["precision"]["base_dtype"],
    }


def get_eval_adapter(wildcards):
    """The last epoch's adapter; the base model is evaluated without one."""
    if wildcards.run == "base":
        return []
    return paths.ADAPTER.format(ckpt=get_run(wildcards).checkpoint(wildcards.task, EPOCHS))


def get_scratch(wildcards, output):
    """Resumable in-job state: beside, not inside, the declared outputs; one folder per job."""
    return str(scratch_dir_for(output[0]))


def get_quality_grid(wildcards=None):
    return QUALITY["grid"]


def quality_ks():
    return sorted(set(QUALITY["grid"].get("k") or [config["cluster"]["k"]]))


def quality_needs_prior():
    grid = QUALITY["grid"]
    guided = any(v != GUIDANCE_OFF[key] for key in GUIDANCE_OFF for v in grid.get(key) or [])
    return bool(set(PRIOR_METHODS) & set(grid.get("method", []))) or guided


def quality_needs_features():
    """prior_knn reads the warmup features (who is whose neighbour)."""
    return bool(set(FEATURE_METHODS) & set(QUALITY["grid"].get("method", [])))


def get_quality_inputs(wildcards):
    """Full scores at the checkpoint, the clusters, the warmup's scores (static's selection) and, when the grid
    replays prior_rerank or prior-guided ClusterUCB, the prior at the checkpoint."""
    ckpt = paths.task_checkpoint(wildcards.task, wildcards.qckpt)
    inputs = {
        "scores": paths.SCORES.format(ckpt=ckpt, task=wildcards.task),
        "assignments": [assignments(k) for k in quality_ks()],
        "static": paths.SCORES.format(ckpt="warmup", task=wildcards.task),
    }
    if quality_needs_prior():
        inputs["prior"] = prior_scores(ckpt, wildcards.task)
    if quality_needs_features():
        inputs["warmup"] = paths.POOL_MANIFEST.format(ckpt="warmup")
        inputs["warmup_shards"] = get_warmup_shards()
    return inputs


# ---------------------------------------------------------------- resources


def mem_mb_tokenize(wildcards, threads, attempt):
    """The parent plus one tokenizer per worker with its chunks in flight; independent of the pool's size."""
    return (1500 + 400 * threads) * attempt


def mem_mb_heavy(wildcards, attempt):
    """Rules whose memory is not modelled (building / converting the base model)."""
    return 8000 * attempt


# Computed job memory (clusterucb/infra/resources.py): what each job holds. Snakemake evaluates these again
# right before a job runs, when its inputs exist; until then (planning, a dry run) the config's sizes stand in.
# A model not fetched / converted yet: its config.json is not there to size it.
PROVISIONAL_MB = 16000


def model_shape():
    """The base model's shape: the built-in sizes, or config.json of its directory once it exists."""
    if MODEL == BUILTIN_MODEL:
        sizes = config["model_builtin"]
        return ModelShape(
            sizes["vocab_size"],
            sizes["hidden_size"],
            sizes["intermediate_size"],
            sizes["num_layers"],
            sizes["hidden_size"] * sizes["num_kv_heads"] // sizes["num_heads"],
            sizes["max_position_embeddings"],
        )
    base = get_base_model()
    return ModelShape.from_dir(base if os.path.isdir(base) else os.path.dirname(base))


def pool_rows(pool_tokens=paths.POOL_TOKENS):
    """Rows of the tokenized pool (its batch headers) once it exists, else the sources' caps."""
    if os.path.exists(pool_tokens):
        return count_rows(pool_tokens)
    caps = [source["max_examples"] for source in config["data"]["sources"].values()]
    return sum(caps) if None not in caps else 300_000  # an uncapped source: the paper's pool size


def model_mem_mb(batch_tokens, training, held_mb, attempt):
    shape = model_shape()
    if shape is None:
        return PROVISIONAL_MB * attempt
    precision = config["precision"]
    mb = model_job_mb(
        shape,
        precision["base_dtype"],
        batch_tokens,
        config["lora"]["r"],
        training,
        activations_in_host=not precision["activations_on_gpu"],
        checkpointing=precision["gradient_checkpointing"],
        held_mb=held_mb,
    )
    return mb * attempt


def mem_mb_train(wildcards, input, attempt):
    """Training: model, LoRA + AdamW, one micro-batch; the rows it touches are read from the memory map."""
    tokens = config["train"]["micro_batch"] * config["data"]["max_length"]
    return model_mem_mb(tokens, True, 0, attempt)


def mem_mb_grads_shard(wildcards, input, attempt):
    """A gradient shard: model, one batch, and its own rows' features (not the pool's)."""
    rows = math.ceil(pool_rows(input.pool) / N_SHARDS)
    held = features_mb(rows, config["gradients"]["proj_dim"])
    return model_mem_mb(config["gradients"]["max_batch_tokens"], False, held, attempt)


def mem_mb_grads_small(wildcards, input, attempt):
    """Validation gradients and budgeted re-selection: model, one batch, small tables (ids, labels, rewards)."""
    held = pool_rows(input.pool) * 400 / 2**20 if "pool" in input.keys() else 0
    return model_mem_mb(config["gradients"]["max_batch_tokens"], False, held, attempt)


def mem_mb_evaluate(wildcards, input, attempt):
    """Evaluation: model + LoRA, no gradients; the task's largest forward (its generation, scoring, target loss)."""
    shape = model_shape()
    if shape is None:
        return PROVISIONAL_MB * attempt
    settings = TASK_SETTINGS[wildcards.task]
    evaluation = evaluation_batch(
        shape,
        config["precision"]["base_dtype"],
        config["target"]["eval_batch_size"],
        config["data"]["val_max_length"],
        settings.max_new_tokens or 0,
        settings.sampled_sequences,
        settings.task_metric,
    )
    mb = evaluate_job_mb(
        shape,
        config["precision"]["base_dtype"],
        config["lora"]["r"],
        evaluation,
        activations_in_host=not config["precision"]["activations_on_gpu"],
    )
    return mb * attempt


def mem_mb_kmeans(wildcards, input, attempt):
    """k-means: the prepared features in memory when they fit in cluster.cache_mb, plus a few row blocks."""
    store_mb = sum(os.path.getsize(f) for f in input.shards if os.path.exists(f)) / 2**20
    if store_mb == 0:  # planning: the shards are not written yet
        store_mb = (
            pool_rows()
            * config["gradients"]["proj_dim"]
            * DTYPE_BYTES[config["gradients"]["dtype"]]
            / 2**20
        )
    mb = kmeans_job_mb(
        store_mb,
        config["gradients"]["dtype"],
        config["cluster"]["cache_mb"],
        16384,
        config["gradients"]["proj_dim"],
    )
    return mb * attempt


def mem_mb_scores(wildcards, input, attempt):
    """Full matching: the largest shard's features in float32, the validation features, the scores."""
    sizes = [os.path.getsize(f) for f in input.shards if os.path.exists(f)]
    shard_mb = max(sizes, default=0) / 2**20 * 4 / DTYPE_BYTES[config["gradients"]["dtype"]]
    if not sizes:
        shard_mb = pool_rows() / N_SHARDS * config["gradients"]["proj_dim"] * 4 / 2**20
    return math.ceil(1.25 * (RUNTIME_MB + 2 * shard_mb + pool_rows() * 400 / 2**20)) * attempt


def runtime_heavy(wildcards, attempt):
    return 120 * attempt


def report_gpu_memory():
    """At start (the main Snakemake process, a dry run included), for a run on GPUs (precision.gpu_memory_gb
    or activations_on_gpu set): each heavy job's GPU memory estimate, and a warning for each job sure to
    run out of the card's memory (clusterucb/infra/resources.py gpu_plan)."""
    precision = config["precision"]
    if not workflow.is_main_process or not (
        precision.get("gpu_memory_gb") or precision["activations_on_gpu"]
    ):
        return
    shape = model_shape()
    if shape is None:
        print("GPU memory estimate: the model's config.json is not there yet", file=sys.stderr)
        return
    settings = list(TASK_SETTINGS.values())
    max_new = max([s.max_new_tokens or 0 for s in settings], default=0)
    sampled = [s.sampled_sequences for s in settings if s.sampled_sequences]
    plans = gpu_plan(config, shape, pool_rows(), max_new, max(sampled, default=None))
    lines, warnings = format_gpu_plan(plans, precision.get("gpu_memory_gb"))
    print("\n".join(lines), file=sys.stderr)
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)


report_gpu_memory()


# ---------------------------------------------------------------- targets


def selection_files(task, run):
    return [
        f"{paths.checkpoint_dir(RUNS[run].checkpoint(task, e))}/selection.parquet"
        for e in range(1, EPOCHS + 1)
    ]


def recall_files(task, run):
    if not SELECTION["oracle"] or RUNS[run].method not in BUDGETED:
        return []
    return [paths.RECALL.format(task=task, run=run, epoch=e) for e in range(2, EPOCHS + 1)]


def draws_files(task, run):
    if RUNS[run].method not in BUDGETED:
        return []
    return [paths.DRAWS.format(task=task, run=run, epoch=e) for e in range(2, EPOCHS + 1)]


def get_compare_inputs(wildcards=None):
    return {
        "metrics": [paths.METRICS.format(task=t, run=r) for t in TASKS for r in ["base", *RUNS]],
        "selections": [f for t in TASKS for run in RUNS for f in selection_files(t, run)],
        "recalls": [f for t in TASKS for run in RUNS for f in recall_files(t, run)],
    }


def get_compare_params(wildcards=None):
    return {
        "runs": {
            name: {"method": run.method, **run.params, "train_seed": run.train_seed}
            for name, run in RUNS.items()
        },
        "selections": {t: {run: selection_files(t, run) for run in RUNS} for t in TASKS},
        "recalls": {t: {run: recall_files(t, run) for run in RUNS} for t in TASKS},
        "metrics": {t: get_task(t).metric for t in TASKS},
    }


def get_quality_tables(wildcards=None):
    points = [(t, c) for t in TASKS for c in QUALITY["checkpoints"]]
    return {
        "sweeps": [paths.QUALITY_SWEEP.format(task=t, qckpt=c) for t, c in points],
        "clusters": [paths.QUALITY_CLUSTERS.format(task=t, qckpt=c) for t, c in points],
    }


def get_all_draws(wildcards=None):
    return [f for t in TASKS for run in BUDGETED_RUNS for f in draws_files(t, run)]


def get_warmup_scores(wildcards=None):
    return [paths.SCORES.format(ckpt="warmup", task=t) for t in TASKS]


def get_arm_pull_plots():
    if not SELECTION["oracle"] or EPOCHS < 2 or not BUDGETED_RUNS:
        return []
    return [f"{paths.REPORT}/figures/arm_pulls/{t}.png" for t in TASKS]


def get_arm_inputs(wildcards):
    return [
        paths.ARMS.format(task=wildcards.task, run=run, epoch=e)
        for run in BUDGETED_RUNS
        for e in range(2, EPOCHS + 1)
    ]


def get_run_selections(wildcards):
    """A run's selection of every epoch for one target task (the export's inputs)."""
    return selection_files(wildcards.task, get_run(wildcards).name)


def selected_exports():
    """Every run's selected examples as JSONL, per task and epoch, and each run's final selection."""
    return [
        path
        for task in TASKS
        for run in RUNS
        for path in [
            *expand(paths.SELECTED, task=task, run=run, epoch=range(1, EPOCHS + 1)),
            paths.SELECTED_FINAL.format(task=task, run=run),
        ]
    ]


def get_final_outputs():
    outputs = [
        *selected_exports(),
        f"{paths.REPORT}/pool.md",
        f"{paths.REPORT}/comparison.md",
        f"{paths.REPORT}/comparison.parquet",
        f"{paths.REPORT}/config.yaml",
        f"{paths.REPORT}/figures/cluster_influence.png",
        *get_arm_pull_plots(),
    ]
    if QUALITY["checkpoints"]:
        outputs += [f"{paths.REPORT}/quality.md", f"{paths.REPORT}/figures/recall_vs_budget.png"]
    if get_all_draws():
        outputs.append(f"{paths.REPORT}/figures/cumulative_reward.png")
    return outputs
