from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.report import cluster_influence_figure  # noqa: E402

cluster_influence_figure(list(snakemake.input.scores), snakemake.input.assignments, snakemake.output[0])  # noqa: F821
finish()
