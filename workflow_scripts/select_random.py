from _common import init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.select import select_random  # noqa: E402

p = snakemake.params  # noqa: F821
select_random(snakemake.input.pool, snakemake.output.selection, p.top_p, p.seed, "random", int(snakemake.wildcards.epoch))  # noqa: F821
