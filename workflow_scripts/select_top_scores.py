from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.select import select_top_scores  # noqa: E402

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards  # noqa: F821
select_top_scores(i.scores, i.pool, o.selection, p.top_p, w.task, w.run, int(w.epoch))
finish()
