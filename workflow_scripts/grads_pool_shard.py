from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)
from clusterucb.infra import paths
from clusterucb.pipeline.grads import grads_pool_shard

i, o, p = snakemake.input, snakemake.output, snakemake.params
grads_pool_shard(
    model_dir=model_dir(i.model),
    adapter_dir=str(Path(i.adapter).parent),
    optimizer_path=i.optimizer,
    checkpoint=paths.checkpoint_dir(snakemake.wildcards.ckpt),
    pool_tokens=i.pool,
    shard=int(snakemake.wildcards.shard),
    n_shards=p.n_shards,
    tensors_out=o.tensors,
    index_out=o.index,
    params={**p.grads, **throughput(snakemake, "gradients"), **throughput(snakemake, "precision")},
    scratch=p.scratch,
)
finish()
