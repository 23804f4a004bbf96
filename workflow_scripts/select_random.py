from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.select import select_random  # noqa: E402

p, w = snakemake.params, snakemake.wildcards  # noqa: F821
select_random(snakemake.input.pool, snakemake.output.selection, p.top_p, p.seed, w.task, w.run, int(w.epoch))  # noqa: F821
finish()
