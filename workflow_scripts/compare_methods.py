from _common import finish, init

init(snakemake)
from clusterucb.pipeline.report import compare

i, o, p = snakemake.input, snakemake.output, snakemake.params
compare(
    metrics_paths=list(i.metrics),
    params=p.compare,
    table_out=o.table,
    markdown_out=o.markdown,
    config_out=o.config,
    config=p.config,
)
finish()
