# The selected examples out of the workflow: every run's selection of every epoch as JSONL in the pool's
# own format (open-instruct messages, the user's ids kept), and what each source gave the pool.


rule export_selections:
    input:
        selections=get_run_selections,
        pool_table=paths.POOL,
    output:
        epochs=expand(paths.SELECTED, epoch=range(1, EPOCHS + 1), allow_missing=True),
        final=paths.SELECTED_FINAL,
    log:
        "logs/export_selections/{task}/{run}.log",
    wildcard_constraints:
        task=alternatives(TASKS),
        run=runs_pattern(METHODS),
    localrule: True
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/export_selections.py"


rule report_pool:
    input:
        pool=paths.POOL,
        tokens=paths.POOL_TOKENS,
    output:
        markdown=report(
            f"{paths.REPORT}/pool.md",
            caption="../report/pool.rst",
            category="Data",
        ),
    log:
        "logs/report_pool.log",
    localrule: True
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/report_pool.py"
