from _common import finish, init

init(snakemake)
from clusterucb.pipeline.report import quality_table

o = snakemake.output
i = snakemake.input
quality_table(
    sweep_paths=list(i.sweeps),
    cluster_paths=list(i.clusters),
    table_out=o.table,
    markdown_out=o.markdown,
    figure_out=o.figure,
)
finish()
