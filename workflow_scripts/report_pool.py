from _common import finish, init

init(snakemake)
from clusterucb.pipeline.report import pool_report

i, o = snakemake.input, snakemake.output
pool_report(pool_table=i.pool, pool_tokens=i.tokens, markdown_out=o.markdown)
finish()
