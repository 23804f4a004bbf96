from _common import checkpoint_dir, init, model_dir

init(snakemake)  # noqa: F821
from clusterucb.pipeline.grads import grads_pool_shard  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
grads_pool_shard(model_dir(i.model), checkpoint_dir(i.adapter), i.pool, int(snakemake.wildcards.shard), p.n_shards, o.tensors, o.index, p.grads, p.scratch)  # noqa: F821
