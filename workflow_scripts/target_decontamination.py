from _common import finish, init, named_inputs

init(snakemake)  # noqa: F821
from clusterucb.pipeline.data import target_decontamination  # noqa: E402

target_decontamination(snakemake.wildcards.task, named_inputs(snakemake), snakemake.output[0])  # noqa: F821
finish()
