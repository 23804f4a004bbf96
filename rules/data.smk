# Staged sources -> target tasks' sets, pool table, tokenized pool and validation sets.


# A dataset file missing from datasets_dir, fetched from its public source at the pinned commit and
# verified against the shipped sha256 (clusterucb/data/remote.py). A file the folder holds is never
# fetched. shell, not script: Snakemake would rerun a script rule whose output (a staged mirror file)
# is older than the script, i.e. re-download a whole mirror after a checkout.
rule fetch_dataset:
    output:
        datasets_path("{dataset_file}"),
    log:
        "logs/fetch_dataset/{dataset_file}.log",
    wildcard_constraints:
        dataset_file=remote_files_pattern(),
    retries: 2
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        # Changes no byte (every file is sha256-verified), but Snakemake tracks it: a new URL refetches
        # files fetched before. Files a mirror holds were never fetched and are never touched.
        base_url=config["datasets_url"],
    shell:
        "python -m clusterucb.data.remote --fetch {wildcards.dataset_file:q} --base-url {params.base_url:q} --out {output:q} > {log:q} 2>&1"


rule prepare_validation:
    input:
        unpack(get_task_files),
    output:
        paths.TARGET_VAL,
    log:
        "logs/prepare_validation/{task}.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        settings=get_validation_settings,
        seed=config["seed"],
    script:
        "../workflow_scripts/prepare_validation.py"


rule prepare_test:
    input:
        unpack(get_task_files),
    output:
        paths.TARGET_TEST,
    log:
        "logs/prepare_test/{task}.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        settings=get_test_settings,
        seed=config["seed"],
    script:
        "../workflow_scripts/prepare_test.py"


rule target_decontamination:
    input:
        unpack(get_task_files),
    output:
        paths.TARGET_DECONTAM,
    log:
        "logs/target_decontamination/{task}.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/target_decontamination.py"


rule build_pool:
    input:
        sources=get_source_files(),
        decontamination=get_decontamination_files(),
    output:
        paths.POOL,
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
        pool=paths.POOL,
        model=get_base_model,
    output:
        paths.POOL_TOKENS,
    log:
        "logs/tokenize_pool.log",
    benchmark:
        "results/benchmarks/tokenize_pool.tsv"
    conda:
        "../envs/torch.yaml"
    # Worker processes over chunks of the pool (same file whatever the count; Snakemake lowers it to --cores).
    threads: 8
    resources:
        # Bounded by the chunks in flight (2 per worker), not by the pool.
        mem_mb=mem_mb_tokenize,
        runtime=30,
    params:
        scratch=get_scratch,
        max_length=config["data"]["max_length"],
        chat_template=config["data"]["chat_template"],
        overlong=config["data"]["overlong"],
        on_unusable=config["data"]["on_unusable"],
    script:
        "../workflow_scripts/tokenize_pool.py"


rule tokenize_target:
    input:
        val=paths.TARGET_VAL,
        model=get_base_model,
    output:
        paths.TARGET_VAL_TOKENS,
    log:
        "logs/tokenize_target/{task}.log",
    localrule: True
    conda:
        "../envs/torch.yaml"
    params:
        max_length=config["data"]["val_max_length"],
        chat_template=config["data"]["chat_template"],
    script:
        "../workflow_scripts/tokenize_target.py"
