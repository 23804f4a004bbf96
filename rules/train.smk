# LoRA training: the warmup checkpoint on the pool and LESS's warmup checkpoints (shared by every
# target), and one epoch per selection (per target).


rule warmup_lora:
    input:
        model=get_base_model,
        pool=paths.POOL_TOKENS,
    output:
        adapter=paths.ADAPTER.format(ckpt="warmup"),
        adapter_config=paths.ADAPTER_CONFIG.format(ckpt="warmup"),
        optimizer=paths.OPTIMIZER.format(ckpt="warmup"),
        train_log=paths.TRAIN_LOG.format(ckpt="warmup"),
    log:
        "logs/warmup_lora.log",
    benchmark:
        "results/benchmarks/warmup_lora.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_train,
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
        model=get_base_model,
        pool=paths.POOL_TOKENS,
    output:
        adapters=get_less_outputs("ADAPTER"),
        adapter_configs=get_less_outputs("ADAPTER_CONFIG"),
        optimizers=get_less_outputs("OPTIMIZER"),
        train_log=paths.LESS_TRAIN_LOG,
    log:
        "logs/less_warmup.log",
    benchmark:
        "results/benchmarks/less_warmup.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_train,
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
        model=get_base_model,
        pool=paths.POOL_TOKENS,
    output:
        adapter=paths.ADAPTER.format(ckpt=paths.RUN_CKPT),
        adapter_config=paths.ADAPTER_CONFIG.format(ckpt=paths.RUN_CKPT),
        optimizer=paths.OPTIMIZER.format(ckpt=paths.RUN_CKPT),
        train_log=paths.TRAIN_LOG.format(ckpt=paths.RUN_CKPT),
    log:
        "logs/train_epoch/{task}/{run}/epoch-{epoch}.log",
    benchmark:
        "results/benchmarks/train_epoch/{task}/{run}/epoch-{epoch}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_train,
        runtime=runtime_heavy,
    params:
        lora=config["lora"],
        train=get_train_params(),
        top_p=config["selection"]["top_p"],
        seed=get_train_seed,
        lora_init_seed=config["seed"],  # the warmup's: see clusterucb.pipeline.train.train_epoch
        scratch=get_scratch,
    script:
        "../workflow_scripts/train_epoch.py"
