# clusterucb: targeted instruction-tuning data selection with Dynamic-ClusterUCB.
#
# Data flow (every path below is under results/):
#   data/target/{val,test}.parquet   GSM8K validation (train split) and test sets
#   data/pool.parquet                the pool, open-instruct messages, stable example_id
#   model/base/                      base model (built-in tiny Llama, or converted GGUF)
#   data/pool_tokens.parquet         tokenized pool, prompt tokens masked
#   warmup/                          LoRA warmup checkpoint: adapter/ + optimizer.safetensors
#   grads/warmup/pool/               per-sample Adam gradient features, one shard per job + manifest
#   grads/<ckpt>/val.*               validation gradient features at each selecting checkpoint
#   grads/<ckpt>/scores.parquet      full-pool influence at a checkpoint (Dynamic, LESS, oracle)
#   cluster/k-<k>/                   cosine k-means of the warmup features
#   less/ckpt-<i>/                   LESS warmup checkpoints (random subset, a few epochs)
#   runs/<run>/epoch-<e>/            selection.parquet (+ draws.parquet, recall.json), adapter/, optimizer.safetensors
#   eval/<run>/metrics.json          target-task metrics of the final adapter
#   quality/<ckpt>/sweep.parquet     budgeted selection replayed on full-pool scores (recall sweep)
#   report/                          comparison and quality tables, figures, resolved config
# <ckpt> is "warmup", "less/ckpt-<i>" or "runs/<run>/epoch-<e>"; a <run> is a method and the
# parameters it changes (clusterucb/runs.py). Logs mirror these under logs/, per-job timings
# under results/benchmarks/.


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/train.smk"
include: "rules/gradients.smk"
include: "rules/cluster.smk"
include: "rules/select.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
    localrule: True
