from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)  # noqa: F821
from clusterucb.infra import paths  # noqa: E402
from clusterucb.pipeline.grads import grads_val  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
grads_val(model_dir(i.model), str(Path(i.adapter).parent), paths.checkpoint_dir(snakemake.wildcards.ckpt), i.val, o.tensors, o.index, {**p.grads, **throughput(snakemake, "gradients"), **throughput(snakemake, "precision")})  # noqa: F821
finish()
