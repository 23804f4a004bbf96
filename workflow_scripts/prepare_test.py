from _common import finish, init, named_inputs

init(snakemake)
from clusterucb.pipeline.data import prepare_test

p, w = snakemake.params, snakemake.wildcards
prepare_test(
    task=w.task,
    files=named_inputs(snakemake),
    out=snakemake.output[0],
    settings=p.settings,
    seed=p.seed,
)
finish()
