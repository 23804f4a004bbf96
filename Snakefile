# clusterucb: targeted instruction-tuning data selection with Dynamic-ClusterUCB.
#
# Data flow (every path below is under results/; clusterucb/infra/paths.py defines them):
#   data/pool.parquet                the pool: your rows (id, dataset, messages) with a stable example_id
#   data/targets/<task>/             each target's validation and test sets
#   model/base/                      base model (built-in tiny Llama, or converted GGUF)
#   data/pool_tokens.arrow           tokenized pool, prompt tokens masked (memory-mapped)
#   warmup/                          LoRA warmup checkpoint: adapter/ + optimizer.safetensors
#   grads/warmup/pool/               per-sample Adam gradient features, one shard per job + manifest
#   grads/<ckpt>/val/<task>.*        validation gradient features at each selecting checkpoint
#   grads/<ckpt>/scores/<task>.*     full-pool influence at a checkpoint (Dynamic, LESS, oracle)
#   cluster/k-<k>/                   cosine k-means of the warmup features
#   less/ckpt-<i>/                   LESS warmup checkpoints (random subset, a few epochs)
#   runs/<task>/<run>/epoch-<e>/     selection.parquet (+ draws.parquet, recall.json), adapter/, optimizer.safetensors
#   selected/<task>/<run>/           the selected examples as JSONL (epoch-<e>.jsonl, final.jsonl)
#   eval/<task>/<run>/metrics.json   target-task metrics of the final adapter
#   quality/<task>/<ckpt>/           budgeted selection replayed on full-pool scores (recall sweep)
#   report/                          comparison, pool and quality tables, figures, resolved config
# <ckpt> is "warmup", "less/ckpt-<i>" or "runs/<task>/<run>/epoch-<e>"; a <run> is a method and the
# parameters it changes (clusterucb/selection/runs.py). Logs mirror these under logs/, per-job timings
# under results/benchmarks/.
#
# The config is config.yaml's defaults, then your --configfile overlays (or, with none, the embedded
# demo configs/demo.yaml), then --config: rules/common.smk builds it (clusterucb/infra/config_layers.py).


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
include: "rules/export.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
    localrule: True
