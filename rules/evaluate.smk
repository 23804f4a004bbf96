# Evaluation of each run's final adapter (and of the base model), and the comparison table.


rule evaluate:
    input:
        model=get_base_model(),
        test="results/data/target/test.parquet",
        adapter=get_eval_adapter,
    output:
        metrics="results/eval/{run}/metrics.json",
        predictions="results/eval/{run}/predictions.parquet",
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "results/benchmarks/evaluate/{run}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_heavy,
        runtime=runtime_heavy,
    params:
        eval=get_eval_params(),
    script:
        "../workflow_scripts/evaluate.py"


rule compare_methods:
    input:
        unpack(get_compare_inputs),
    output:
        table="results/report/comparison.parquet",
        markdown=report(
            "results/report/comparison.md",
            caption="../report/comparison.rst",
            category="Results",
        ),
        config="results/report/config.yaml",
    log:
        "logs/compare_methods.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    params:
        compare=get_compare_params(),
        config=config,
    script:
        "../workflow_scripts/compare_methods.py"
