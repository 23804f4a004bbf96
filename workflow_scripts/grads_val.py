from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)
from clusterucb.infra import paths
from clusterucb.pipeline.grads import grads_val

i, o, p = snakemake.input, snakemake.output, snakemake.params
grads_val(
    model_dir=model_dir(i.model),
    adapter_dir=str(Path(i.adapter).parent),
    checkpoint=paths.checkpoint_dir(snakemake.wildcards.ckpt),
    val_tokens=i.val,
    tensors_out=o.tensors,
    index_out=o.index,
    params={**p.grads, **throughput(snakemake, "gradients"), **throughput(snakemake, "precision")},
)
finish()
