from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.report import pool_report  # noqa: E402

i, o = snakemake.input, snakemake.output  # noqa: F821
pool_report(pool_table=i.pool, pool_tokens=i.tokens, markdown_out=o.markdown)
finish()
