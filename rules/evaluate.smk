# Evaluation of each run's final adapter (and of the base model) on each target task, and the comparison table.


rule evaluate:
    input:
        model=get_base_model,
        test=paths.TARGET_TEST,
        adapter=get_eval_adapter,
    output:
        metrics=paths.METRICS,
        predictions=paths.PREDICTIONS,
    log:
        "logs/evaluate/{task}/{run}.log",
    benchmark:
        "results/benchmarks/evaluate/{task}/{run}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_evaluate,
        runtime=runtime_heavy,
    params:
        eval=get_eval_params,
    script:
        "../workflow_scripts/evaluate.py"


rule compare_methods:
    input:
        unpack(get_compare_inputs),
    output:
        table=f"{paths.REPORT}/comparison.parquet",
        markdown=report(
            f"{paths.REPORT}/comparison.md",
            caption="../report/comparison.rst",
            category="Results",
        ),
        config=f"{paths.REPORT}/config.yaml",
    log:
        "logs/compare_methods.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        compare=get_compare_params(),
        config=result_config(config),
    script:
        "../workflow_scripts/compare_methods.py"
