from _common import checkpoint_dir, init, model_dir

init(snakemake)  # noqa: F821
from clusterucb.pipeline.grads import grads_val  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
grads_val(model_dir(i.model), checkpoint_dir(i.adapter), i.val, o.tensors, o.index, p.grads)
