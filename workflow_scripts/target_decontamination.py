from _common import finish, init, named_inputs

init(snakemake)
from clusterucb.pipeline.data import target_decontamination

target_decontamination(
    task=snakemake.wildcards.task,
    files=named_inputs(snakemake),
    out=snakemake.output[0],
)
finish()
