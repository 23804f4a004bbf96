from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.grads import grads_manifest  # noqa: E402

grads_manifest(list(snakemake.input.tensors), list(snakemake.input.indexes), snakemake.output[0])  # noqa: F821
finish()
