from _common import finish, init

init(snakemake)
from clusterucb.pipeline.select import select_static

i, o, w = snakemake.input, snakemake.output, snakemake.wildcards
select_static(
    epoch1_selection=i.epoch1,
    pool_table=i.pool_table,
    selection_out=o.selection,
    task=w.task,
    run=w.run,
    epoch=int(w.epoch),
)
finish()
