from _common import init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.evaluate import compare  # noqa: E402

p = snakemake.params  # noqa: F821
o = snakemake.output  # noqa: F821
compare(p.methods, list(snakemake.input.metrics), p.selections, o.table, o.markdown, o.config, p.config)  # noqa: F821
