# LoRA training: the warmup checkpoint on the pool, LESS's warmup checkpoints, and one epoch per selection.


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


rule less_warmup:
    input:
        model=get_base_model(),
        pool="results/data/pool_tokens.parquet",
    output:
        adapters=get_less_outputs("adapter/adapter_model.safetensors"),
        adapter_configs=get_less_outputs("adapter/adapter_config.json"),
        optimizers=get_less_outputs("optimizer.safetensors"),
        train_log="results/less/train_log.parquet",
    log:
        "logs/less_warmup.log",
    benchmark:
        "results/benchmarks/less_warmup.tsv"
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
        less=config["less"],
        seed=config["seed"],
        scratch=get_scratch,
    script:
        "../workflow_scripts/less_warmup.py"


rule train_epoch:
    input:
        unpack(get_train_inputs),
        model=get_base_model(),
        pool="results/data/pool_tokens.parquet",
    output:
        adapter="results/runs/{run}/epoch-{epoch}/adapter/adapter_model.safetensors",
        adapter_config="results/runs/{run}/epoch-{epoch}/adapter/adapter_config.json",
        optimizer="results/runs/{run}/epoch-{epoch}/optimizer.safetensors",
        train_log="results/runs/{run}/epoch-{epoch}/train_log.parquet",
    log:
        "logs/train_epoch/{run}/epoch-{epoch}.log",
    benchmark:
        "results/benchmarks/train_epoch/{run}/epoch-{epoch}.tsv"
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
