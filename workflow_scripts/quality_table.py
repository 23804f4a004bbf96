from _common import init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.report import quality_table  # noqa: E402

o = snakemake.output  # noqa: F821
quality_table(list(snakemake.input), o.table, o.markdown, o.figure)  # noqa: F821
