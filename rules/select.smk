# Per-epoch selection of every run for every target task (see clusterucb/selection/runs.py for the methods),
# and the oracle's recall. results/runs/<task>/full_matching/epoch-1 is the epoch 1 shared by
# every Dynamic-family run of a target.


rule select_top_scores:
    input:
        scores=get_top_scores_input,
        pool=paths.POOL_TOKENS,
        pool_table=paths.POOL,
    output:
        selection=paths.SELECTION,
    log:
        "logs/select/{task}/{run}/epoch-{epoch}.log",
    wildcard_constraints:
        run=runs_pattern(["dynamic"], extra=list(EPOCH1_RUNS)),
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
        model=get_base_model,
        pool=paths.POOL_TOKENS,
        pool_table=paths.POOL,
    output:
        selection=paths.SELECTION,
        draws=paths.DRAWS,
    log:
        "logs/select/{task}/{run}/epoch-{epoch}.log",
    benchmark:
        "results/benchmarks/select/{task}/{run}/epoch-{epoch}.tsv"
    wildcard_constraints:
        run=runs_pattern(BUDGETED),
        epoch=r"[2-9]|[1-9]\d+",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_grads_small,
        runtime=runtime_heavy,
    params:
        grads=get_grad_params(),
        run=get_run_params,
        top_p=config["selection"]["top_p"],
        scratch=get_scratch,
    script:
        "../workflow_scripts/select_budgeted.py"


rule select_static:
    input:
        epoch1=get_static_input,
        pool_table=paths.POOL,
    output:
        selection=paths.SELECTION,
    log:
        "logs/select/{task}/{run}/epoch-{epoch}.log",
    wildcard_constraints:
        run=runs_pattern(["static"]),
        epoch=r"[2-9]|[1-9]\d+",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/select_static.py"


rule select_random:
    input:
        pool=paths.POOL_TOKENS,
        pool_table=paths.POOL,
    output:
        selection=paths.SELECTION,
    log:
        "logs/select/{task}/{run}/epoch-{epoch}.log",
    wildcard_constraints:
        run=runs_pattern(["random"]),
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
        scores=get_less_scores,
        train_log=paths.LESS_TRAIN_LOG,
        pool=paths.POOL_TOKENS,
        pool_table=paths.POOL,
    output:
        selection=paths.SELECTION,
    log:
        "logs/select/{task}/{run}/epoch-{epoch}.log",
    wildcard_constraints:
        run=runs_pattern(["less"]),
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
        recall=paths.RECALL,
        arms=paths.ARMS,
    log:
        "logs/recall/{task}/{run}/epoch-{epoch}.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        top_p=config["selection"]["top_p"],
    script:
        "../workflow_scripts/recall.py"
