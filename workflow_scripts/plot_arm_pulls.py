from _common import finish, init

init(snakemake)
from clusterucb.pipeline.report import arm_pulls_figure

arm_pulls_figure(
    arms_paths=list(snakemake.input),
    task=snakemake.wildcards.task,
    out=snakemake.output[0],
)
finish()
