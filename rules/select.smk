# Per-epoch selection of every run (see clusterucb/runs.py for the methods), and the oracle's recall.
# results/runs/full_matching/epoch-1 is the epoch 1 shared by every Dynamic-family run.


rule select_top_scores:
    input:
        scores=get_top_scores_input,
        pool="results/data/pool_tokens.parquet",
        assignments=assignments(config["cluster"]["k"]),
    output:
        selection="results/runs/{run}/epoch-{epoch}/selection.parquet",
    log:
        "logs/select/{run}/epoch-{epoch}.log",
    wildcard_constraints:
        run="full_matching|dynamic",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        top_p=config["selection"]["top_p"],
    script:
        "../workflow_scripts/select_top_scores.py"


rule select_budgeted:
    input:
        unpack(get_budgeted_inputs),
        model=get_base_model(),
        pool="results/data/pool_tokens.parquet",
        val_tokens="results/data/target/val_tokens.parquet",
    output:
        selection="results/runs/{run}/epoch-{epoch}/selection.parquet",
        draws="results/runs/{run}/epoch-{epoch}/draws.parquet",
    log:
        "logs/select/{run}/epoch-{epoch}.log",
    benchmark:
        "results/benchmarks/select/{run}/epoch-{epoch}.tsv"
    wildcard_constraints:
        run=r"(clusterucb|random_draw)(__[A-Za-z0-9_.\-]+)?",
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
        run=get_run_params,
        top_p=config["selection"]["top_p"],
    script:
        "../workflow_scripts/select_budgeted.py"


rule select_random:
    input:
        pool="results/data/pool_tokens.parquet",
    output:
        selection="results/runs/{run}/epoch-{epoch}/selection.parquet",
    log:
        "logs/select/{run}/epoch-{epoch}.log",
    wildcard_constraints:
        run=r"random(__seed-\d+)?",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        top_p=config["selection"]["top_p"],
        seed=get_random_seed,
    script:
        "../workflow_scripts/select_random.py"


rule select_less:
    input:
        scores=get_less_scores(),
        train_log="results/less/train_log.parquet",
        pool="results/data/pool_tokens.parquet",
    output:
        selection="results/runs/{run}/epoch-{epoch}/selection.parquet",
    log:
        "logs/select/{run}/epoch-{epoch}.log",
    wildcard_constraints:
        run="less",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        top_p=config["selection"]["top_p"],
    script:
        "../workflow_scripts/select_less.py"


rule recall:
    input:
        unpack(get_recall_inputs),
    output:
        recall="results/runs/{run}/epoch-{epoch}/recall.json",
        arms="results/runs/{run}/epoch-{epoch}/arms.parquet",
    log:
        "logs/recall/{run}/epoch-{epoch}.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        top_p=config["selection"]["top_p"],
    script:
        "../workflow_scripts/recall.py"
