from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.select import select_static  # noqa: E402

i, o, w = snakemake.input, snakemake.output, snakemake.wildcards  # noqa: F821
select_static(
    epoch1_selection=i.epoch1, pool_table=i.pool_table, selection_out=o.selection, task=w.task, run=w.run, epoch=int(w.epoch),
)
finish()
