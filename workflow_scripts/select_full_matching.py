from _common import init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.select import select_matching  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
select_matching(i.manifest, i.val_tensors, i.val_index, i.val_tokens, i.assignments, i.pool, o.selection, o.scores, p.top_p, "clusterucb", 1)
