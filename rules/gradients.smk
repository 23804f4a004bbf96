# Per-sample gradient features: pool shards at the warmup checkpoint, validation sets at every selecting checkpoint.


rule grads_pool_shard:
    input:
        unpack(get_warmup_checkpoint),
        model=get_base_model(),
        pool="results/data/pool_tokens.parquet",
    output:
        tensors="results/grads/warmup/pool/shard-{shard}.safetensors",
        index="results/grads/warmup/pool/shard-{shard}.parquet",
    log:
        "logs/grads_pool_shard/shard-{shard}.log",
    benchmark:
        "results/benchmarks/grads_pool_shard/shard-{shard}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=mem_mb_heavy,
        runtime=runtime_heavy,
    params:
        n_shards=N_SHARDS,
        grads=get_grad_params(),
    script:
        "../workflow_scripts/grads_pool_shard.py"


rule grads_manifest:
    input:
        unpack(get_pool_shards),
    output:
        "results/grads/warmup/pool/manifest.parquet",
    log:
        "logs/grads_manifest.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/grads_manifest.py"


rule grads_val:
    input:
        unpack(get_checkpoint),
        model=get_base_model(),
        val="results/data/target/val_tokens.parquet",
    output:
        tensors="results/grads/{ckpt}/val.safetensors",
        index="results/grads/{ckpt}/val.parquet",
    log:
        "logs/grads_val/{ckpt}.log",
    benchmark:
        "results/benchmarks/grads_val/{ckpt}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_heavy,
        runtime=runtime_heavy,
    params:
        grads=get_grad_params(),
    script:
        "../workflow_scripts/grads_val.py"
