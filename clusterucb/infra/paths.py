"""The results layout, defined once: the rules' output patterns and the helpers that name a checkpoint's files.

Patterns are ``str.format`` templates whose fields are the rules' wildcards:
``{task}`` (a target task), ``{run}`` (clusterucb/selection/runs.py), ``{epoch}``,
``{shard}``, ``{k}``, ``{i}`` and ``{ckpt}``, a checkpoint under ``results/``:

- ``warmup``                      the LoRA warmup on the pool (clusters, epoch 1's full matching)
- ``less/ckpt-<i>``               LESS's warmup checkpoints
- ``runs/<task>/<run>/epoch-<e>`` a run's checkpoint after epoch e for one target task (``all`` for
                                  runs that do not depend on the target)

Quality sweeps name checkpoints relative to a task (``runs/<run>/epoch-<e>``):
:func:`task_checkpoint` turns them into the form above.
"""

from __future__ import annotations

RESULTS = "results"
SCRATCH_NAME = "scratch"  # resumable in-job state, one folder per job, beside (never inside) the declared outputs
SCRATCH = f"{RESULTS}/{SCRATCH_NAME}"
ALL_TASKS = "all"  # the {task} of runs whose selection does not depend on the target (random)

# data
POOL = "results/data/pool.parquet"
POOL_TOKENS = "results/data/pool_tokens.arrow"  # memory-mapped Arrow IPC (clusterucb/data/tokens.py)
TARGET_VAL = "results/data/targets/{task}/val.parquet"
TARGET_TEST = "results/data/targets/{task}/test.parquet"
TARGET_DECONTAM = "results/data/targets/{task}/decontamination.parquet"
TARGET_VAL_TOKENS = "results/data/targets/{task}/val_tokens.arrow"

# models and checkpoints
BASE_WEIGHTS = "results/model/base/model.safetensors"
ADAPTER = "results/{ckpt}/adapter/adapter_model.safetensors"
ADAPTER_CONFIG = "results/{ckpt}/adapter/adapter_config.json"
OPTIMIZER = "results/{ckpt}/optimizer.safetensors"
TRAIN_LOG = "results/{ckpt}/train_log.parquet"
LESS_TRAIN_LOG = "results/less/train_log.parquet"

# gradient features and scores at a checkpoint
POOL_SHARD = "results/grads/{ckpt}/pool/shard-{shard}.safetensors"
POOL_SHARD_INDEX = "results/grads/{ckpt}/pool/shard-{shard}.parquet"
POOL_MANIFEST = "results/grads/{ckpt}/pool/manifest.parquet"
VAL_GRADS = "results/grads/{ckpt}/val/{task}.safetensors"
VAL_GRADS_INDEX = "results/grads/{ckpt}/val/{task}.parquet"
SCORES = "results/grads/{ckpt}/scores/{task}.parquet"
# the prior at a checkpoint: the *warmup* features against its validation gradients (no pool gradient)
PRIOR_SCORES = "results/grads/{ckpt}/prior/{task}.parquet"

# clusters
ASSIGNMENTS = "results/cluster/k-{k}/assignments.parquet"
CENTROIDS = "results/cluster/k-{k}/centroids.safetensors"

# runs: selection and training per (task, run, epoch); a run's checkpoint is RUN_CKPT
RUN_CKPT = "runs/{task}/{run}/epoch-{epoch}"
RUN_DIR = "results/" + RUN_CKPT
SELECTION = RUN_DIR + "/selection.parquet"
DRAWS = RUN_DIR + "/draws.parquet"
RECALL = RUN_DIR + "/recall.json"
ARMS = RUN_DIR + "/arms.parquet"

# the selected examples as JSONL (the pool's own format), per epoch and the run's last
SELECTED = "results/selected/{task}/{run}/epoch-{epoch}.jsonl"
SELECTED_FINAL = "results/selected/{task}/{run}/final.jsonl"

# evaluation, quality, report
METRICS = "results/eval/{task}/{run}/metrics.json"
PREDICTIONS = "results/eval/{task}/{run}/predictions.parquet"
QUALITY_SWEEP = "results/quality/{task}/{qckpt}/sweep.parquet"
QUALITY_CLUSTERS = "results/quality/{task}/{qckpt}/clusters.parquet"
REPORT = "results/report"


def run_checkpoint(task: str, run: str, epoch: int) -> str:
    return RUN_CKPT.format(task=task, run=run, epoch=epoch)


def checkpoint_files(ckpt: str) -> dict[str, str]:
    """Adapter, adapter config and optimizer state of a checkpoint."""
    return {
        "adapter": ADAPTER.format(ckpt=ckpt),
        "adapter_config": ADAPTER_CONFIG.format(ckpt=ckpt),
        "optimizer": OPTIMIZER.format(ckpt=ckpt),
    }


def checkpoint_dir(ckpt: str) -> str:
    return f"{RESULTS}/{ckpt}"


def checkpoint_of(adapter_weights: str) -> str:
    """The checkpoint whose adapter weights file this is (the inverse of ``ADAPTER``)."""
    prefix, suffix = ADAPTER.split("{ckpt}")
    path = str(adapter_weights)
    if not (path.startswith(prefix) and path.endswith(suffix)):
        raise ValueError(f"{path} is not an adapter of the results layout ({ADAPTER})")
    return path[len(prefix) : -len(suffix)]


def task_checkpoint(task: str, relative: str) -> str:
    """A quality-sweep checkpoint (``warmup``, ``less/ckpt-<i>``, ``runs/<run>/epoch-<e>``) for ``task``."""
    if relative.startswith("runs/"):
        return f"runs/{task}/{relative.removeprefix('runs/')}"
    return relative
