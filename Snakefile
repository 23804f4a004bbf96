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
#   cluster/                         cosine k-means of the warmup features
#   runs/<method>/epoch-<e>/         selection.parquet (+ draws.parquet), adapter/, optimizer.safetensors
#   eval/<method>/metrics.json       target-task metrics of the final adapter
#   report/comparison.{md,parquet}   method x metric table, with gradients computed
# <ckpt> is "warmup" or "runs/<method>/epoch-<e>". Logs mirror these under logs/,
# per-job timings under results/benchmarks/.


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/train.smk"
include: "rules/gradients.smk"
include: "rules/cluster.smk"
include: "rules/select.smk"
include: "rules/evaluate.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
    localrule: True
