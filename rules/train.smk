# LoRA training: the warmup checkpoint on the pool, then one epoch per selection.


rule warmup_lora:
    input:
        model=get_base_model(),
        pool="results/data/pool_tokens.parquet",
    output:
        adapter="results/warmup/adapter/adapter_model.safetensors",
        adapter_config="results/warmup/adapter/adapter_config.json",
        optimizer="results/warmup/optimizer.safetensors",
        train_log="results/warmup/train_log.parquet",
    log:
        "logs/warmup_lora.log",
    benchmark:
        "results/benchmarks/warmup_lora.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_heavy,
        runtime=runtime_heavy,
    params:
        lora=config["lora"],
        train=get_train_params(),
        steps=config["warmup"]["steps"],
        seed=config["seed"],
        scratch=get_scratch,
    script:
        "../workflow_scripts/warmup_lora.py"


rule train_epoch:
    input:
        unpack(get_train_inputs),
        model=get_base_model(),
        pool="results/data/pool_tokens.parquet",
    output:
        adapter="results/runs/{method}/epoch-{epoch}/adapter/adapter_model.safetensors",
        adapter_config="results/runs/{method}/epoch-{epoch}/adapter/adapter_config.json",
        optimizer="results/runs/{method}/epoch-{epoch}/optimizer.safetensors",
        train_log="results/runs/{method}/epoch-{epoch}/train_log.parquet",
    log:
        "logs/train_epoch/{method}/epoch-{epoch}.log",
    benchmark:
        "results/benchmarks/train_epoch/{method}/epoch-{epoch}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_heavy,
        runtime=runtime_heavy,
    params:
        lora=config["lora"],
        train=get_train_params(),
        top_p=config["selection"]["top_p"],
        seed=config["seed"],
        scratch=get_scratch,
    script:
        "../workflow_scripts/train_epoch.py"
