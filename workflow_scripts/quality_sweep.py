from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.quality import quality_sweep  # noqa: E402

i, p = snakemake.input, snakemake.params  # noqa: F821
o = snakemake.output  # noqa: F821
quality_sweep(i.scores, list(i.assignments), p.grid, p.top_p, p.seed, o.sweep, o.clusters)
finish()
