from _common import finish, init, named_inputs

init(snakemake)
from clusterucb.pipeline.data import prepare_validation

p, w = snakemake.params, snakemake.wildcards
prepare_validation(
    task=w.task,
    files=named_inputs(snakemake),
    out=snakemake.output[0],
    settings=p.settings,
    seed=p.seed,
)
finish()
