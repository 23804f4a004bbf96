from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.select import select_less  # noqa: E402

i, w = snakemake.input, snakemake.wildcards  # noqa: F821
select_less(list(i.scores), i.train_log, i.pool, snakemake.output.selection, snakemake.params.top_p, w.task, w.run, int(w.epoch))  # noqa: F821
finish()
