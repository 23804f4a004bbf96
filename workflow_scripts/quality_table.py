from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.report import quality_table  # noqa: E402

o = snakemake.output  # noqa: F821
i = snakemake.input  # noqa: F821
quality_table(list(i.sweeps), list(i.clusters), o.table, o.markdown, o.figure)
finish()
