from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)  # noqa: F821
from clusterucb.infra import paths  # noqa: E402
from clusterucb.pipeline.grads import grads_pool_shard  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
grads_pool_shard(model_dir(i.model), str(Path(i.adapter).parent), i.optimizer, paths.checkpoint_dir(snakemake.wildcards.ckpt), i.pool, int(snakemake.wildcards.shard), p.n_shards, o.tensors, o.index, {**p.grads, **throughput(snakemake, "gradients"), **throughput(snakemake, "precision")}, p.scratch)  # noqa: F821
finish()
