from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.report import compare  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
compare(list(i.metrics), p.compare, o.table, o.markdown, o.config, p.config)
finish()
