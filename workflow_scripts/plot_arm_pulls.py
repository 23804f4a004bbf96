from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.report import arm_pulls_figure  # noqa: E402

arm_pulls_figure(list(snakemake.input), snakemake.wildcards.task, snakemake.output[0])  # noqa: F821
finish()
