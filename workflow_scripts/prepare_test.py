from _common import finish, init, named_inputs

init(snakemake)  # noqa: F821
from clusterucb.pipeline.data import prepare_test  # noqa: E402

p, w = snakemake.params, snakemake.wildcards  # noqa: F821
prepare_test(w.task, named_inputs(snakemake), snakemake.output[0], p.settings, p.seed)  # noqa: F821
finish()
