# Per-sample gradient features at a checkpoint ({ckpt}: warmup, less/ckpt-<i>, runs/<task>/<run>/epoch-<e>):
# pool shards (one job each) + manifest, shared by every target; validation features and
# full-pool influence scores per target task.


rule grads_pool_shard:
    input:
        unpack(get_checkpoint),
        model=get_base_model,
        pool=paths.POOL_TOKENS,
    output:
        tensors=paths.POOL_SHARD,
        index=paths.POOL_SHARD_INDEX,
    log:
        "logs/grads_pool_shard/{ckpt}/shard-{shard}.log",
    benchmark:
        "results/benchmarks/grads_pool_shard/{ckpt}/shard-{shard}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=mem_mb_grads_shard,
        runtime=runtime_heavy,
    params:
        n_shards=N_SHARDS,
        grads=get_grad_params(),
        scratch=get_scratch,
    script:
        "../workflow_scripts/grads_pool_shard.py"


rule grads_manifest:
    input:
        unpack(get_pool_shards),
    output:
        paths.POOL_MANIFEST,
    log:
        "logs/grads_manifest/{ckpt}.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/grads_manifest.py"


rule grads_val:
    input:
        unpack(get_checkpoint),
        model=get_base_model,
        val=paths.TARGET_VAL_TOKENS,
    output:
        tensors=paths.VAL_GRADS,
        index=paths.VAL_GRADS_INDEX,
    log:
        "logs/grads_val/{ckpt}/{task}.log",
    benchmark:
        "results/benchmarks/grads_val/{ckpt}/{task}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_grads_small,
        runtime=runtime_heavy,
    params:
        grads=get_grad_params(),
    script:
        "../workflow_scripts/grads_val.py"


rule full_scores:
    input:
        unpack(get_full_scores_inputs),
        shards=get_pool_shard_tensors,
    output:
        paths.SCORES,
    log:
        "logs/full_scores/{ckpt}/{task}.log",
    benchmark:
        "results/benchmarks/full_scores/{ckpt}/{task}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb_scores,
        runtime=runtime_heavy,
    script:
        "../workflow_scripts/full_scores.py"


# The prior at a later checkpoint: every pool sample's *warmup* feature against that checkpoint's
# validation gradients (full matching's computation on the warmup store; no pool gradient), for
# prior_rerank and ClusterUCB's prior guidance. At the warmup itself it is the warmup's scores.
rule prior_scores:
    input:
        unpack(get_prior_scores_inputs),
    output:
        paths.PRIOR_SCORES,
    log:
        "logs/prior_scores/{ckpt}/{task}.log",
    benchmark:
        "results/benchmarks/prior_scores/{ckpt}/{task}.tsv"
    wildcard_constraints:
        ckpt=rf"less/ckpt-\d+|runs/({TASK_PATTERN})/{RUN_PATTERN}/epoch-\d+",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb_scores,
        runtime=runtime_heavy,
    script:
        "../workflow_scripts/full_scores.py"
