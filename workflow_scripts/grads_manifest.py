from _common import finish, init

init(snakemake)
from clusterucb.pipeline.grads import grads_manifest

grads_manifest(
    tensor_paths=list(snakemake.input.tensors),
    index_paths=list(snakemake.input.indexes),
    out=snakemake.output[0],
)
finish()
