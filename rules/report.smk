# Selection quality simulated at checkpoints with full-pool scores, and the figures of the report.


rule quality_sweep:
    input:
        unpack(get_quality_inputs),
    output:
        sweep=paths.QUALITY_SWEEP,
        clusters=paths.QUALITY_CLUSTERS,
    log:
        "logs/quality_sweep/{task}/{qckpt}.log",
    benchmark:
        "results/benchmarks/quality_sweep/{task}/{qckpt}.tsv"
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        grid=get_quality_grid(),
        top_p=config["selection"]["top_p"],
        seed=config["seed"],
    script:
        "../workflow_scripts/quality_sweep.py"


rule quality_table:
    input:
        unpack(get_quality_tables),
    output:
        markdown=report(
            f"{paths.REPORT}/quality.md",
            caption="../report/quality.rst",
            category="Selection quality",
        ),
        table=f"{paths.REPORT}/quality.parquet",
        figure=report(
            f"{paths.REPORT}/figures/recall_vs_budget.png",
            caption="../report/recall_vs_budget.rst",
            category="Selection quality",
        ),
    log:
        "logs/quality_table.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/quality_table.py"


rule plot_cluster_influence:
    input:
        scores=get_warmup_scores(),
        assignments=assignments(config["cluster"]["k"]),
    output:
        report(
            f"{paths.REPORT}/figures/cluster_influence.png",
            caption="../report/cluster_influence.rst",
            category="Selection quality",
        ),
    log:
        "logs/plot_cluster_influence.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/plot_cluster_influence.py"


rule plot_cumulative_reward:
    input:
        get_all_draws(),
    output:
        report(
            f"{paths.REPORT}/figures/cumulative_reward.png",
            caption="../report/cumulative_reward.rst",
            category="Selection quality",
        ),
    log:
        "logs/plot_cumulative_reward.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/plot_cumulative_reward.py"


rule plot_arm_pulls:
    input:
        get_arm_inputs,
    output:
        report(
            f"{paths.REPORT}/figures/arm_pulls/{{task}}.png",
            caption="../report/arm_pulls.rst",
            category="Selection quality",
            labels={"task": "{task}"},
        ),
    log:
        "logs/plot_arm_pulls/{task}.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/plot_arm_pulls.py"
