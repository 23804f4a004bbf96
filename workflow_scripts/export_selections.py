from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.export import export_selections  # noqa: E402

i, o, w = snakemake.input, snakemake.output, snakemake.wildcards  # noqa: F821
export_selections(
    selections=list(i.selections), pool_table=i.pool_table, epoch_outs=list(o.epochs), final_out=o.final,
    task=w.task, run=w.run,
)
finish()
