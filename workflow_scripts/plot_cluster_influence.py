from _common import finish, init

init(snakemake)
from clusterucb.pipeline.report import cluster_influence_figure

cluster_influence_figure(
    scores_paths=list(snakemake.input.scores),
    assignments_path=snakemake.input.assignments,
    out=snakemake.output[0],
)
finish()
