from _common import finish, init

init(snakemake)
from clusterucb.pipeline.select import select_random

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards
select_random(
    pool_tokens=i.pool,
    pool_table=i.pool_table,
    selection_out=o.selection,
    top_p=p.top_p,
    seed=p.seed,
    task=w.task,
    run=w.run,
    epoch=int(w.epoch),
)
finish()
