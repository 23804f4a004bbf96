# Per-epoch selection. clusterucb: epoch 1 is full matching at the warmup checkpoint,
# later epochs run ClusterUCB at the previous epoch's checkpoint. random: a fixed random subset.


rule select_full_matching:
    input:
        manifest="results/grads/warmup/pool/manifest.parquet",
        shards=get_pool_shards()["tensors"],
        val_tensors="results/grads/warmup/val.safetensors",
        val_index="results/grads/warmup/val.parquet",
        val_tokens="results/data/target/val_tokens.parquet",
        assignments="results/cluster/assignments.parquet",
        pool="results/data/pool_tokens.parquet",
    output:
        selection="results/runs/clusterucb/epoch-1/selection.parquet",
        scores="results/runs/clusterucb/epoch-1/scores.parquet",
    log:
        "logs/select/clusterucb/epoch-1.log",
    benchmark:
        "results/benchmarks/select/clusterucb/epoch-1.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb_heavy,
        runtime=runtime_heavy,
    params:
        top_p=config["selection"]["top_p"],
    script:
        "../workflow_scripts/select_full_matching.py"


rule select_clusterucb:
    input:
        unpack(get_previous_checkpoint),
        unpack(get_previous_val_grads),
        model=get_base_model(),
        pool="results/data/pool_tokens.parquet",
        val_tokens="results/data/target/val_tokens.parquet",
        assignments="results/cluster/assignments.parquet",
    output:
        selection="results/runs/{method}/epoch-{epoch}/selection.parquet",
        draws="results/runs/{method}/epoch-{epoch}/draws.parquet",
    log:
        "logs/select/{method}/epoch-{epoch}.log",
    benchmark:
        "results/benchmarks/select/{method}/epoch-{epoch}.tsv"
    wildcard_constraints:
        method="clusterucb",
        epoch=r"[2-9]|[1-9]\d+",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_heavy,
        runtime=runtime_heavy,
    params:
        grads=get_grad_params(),
        top_p=config["selection"]["top_p"],
        budget=config["selection"]["budget"],
        csp=config["selection"]["csp"],
        policy=config["selection"]["policy"],
        beta=config["selection"]["beta"],
        draw_batch=config["selection"]["draw_batch"],
        seed=config["seed"],
    script:
        "../workflow_scripts/select_clusterucb.py"


rule select_random:
    input:
        pool="results/data/pool_tokens.parquet",
    output:
        selection="results/runs/random/epoch-{epoch}/selection.parquet",
    log:
        "logs/select/random/epoch-{epoch}.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        top_p=config["selection"]["top_p"],
        seed=config["seed"],
    script:
        "../workflow_scripts/select_random.py"
