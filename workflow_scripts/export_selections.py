from _common import finish, init

init(snakemake)
from clusterucb.pipeline.export import export_selections

i, o, w = snakemake.input, snakemake.output, snakemake.wildcards
export_selections(
    selections=list(i.selections),
    pool_table=i.pool_table,
    epoch_outs=list(o.epochs),
    final_out=o.final,
    task=w.task,
    run=w.run,
)
finish()
