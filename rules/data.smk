# Staged sources -> target sets, pool table, tokenized pool and validation set.


rule prepare_target:
    input:
        unpack(get_gsm8k_files),
    output:
        val="results/data/target/val.parquet",
        test="results/data/target/test.parquet",
    log:
        "logs/prepare_target.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        task=config["target"]["task"],
        n_val=config["target"]["n_val"],
        n_test=config["target"]["n_test"],
        seed=config["seed"],
    script:
        "../workflow_scripts/prepare_target.py"


rule build_pool:
    input:
        sources=get_source_files(),
        val="results/data/target/val.parquet",
        test="results/data/target/test.parquet",
    output:
        "results/data/pool.parquet",
    log:
        "logs/build_pool.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        sources=config["data"]["sources"],
        datasets_dir=get_datasets_dir,
        on_malformed=config["data"]["on_malformed"],
        seed=config["seed"],
    script:
        "../workflow_scripts/build_pool.py"


rule tokenize_pool:
    input:
        pool="results/data/pool.parquet",
        model=get_base_model(),
    output:
        "results/data/pool_tokens.parquet",
    log:
        "logs/tokenize_pool.log",
    conda:
        "../envs/torch.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        max_length=config["data"]["max_length"],
        chat_template=config["data"]["chat_template"],
        overlong=config["data"]["overlong"],
        on_unusable=config["data"]["on_unusable"],
    script:
        "../workflow_scripts/tokenize_pool.py"


rule tokenize_target:
    input:
        val="results/data/target/val.parquet",
        model=get_base_model(),
    output:
        "results/data/target/val_tokens.parquet",
    log:
        "logs/tokenize_target.log",
    localrule: True
    conda:
        "../envs/torch.yaml"
    params:
        max_length=config["data"]["val_max_length"],
    script:
        "../workflow_scripts/tokenize_target.py"
