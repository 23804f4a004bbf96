from _common import init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.data import prepare_gsm8k  # noqa: E402

p = snakemake.params  # noqa: F821
prepare_gsm8k(snakemake.input.train, snakemake.input.test, snakemake.output.val, snakemake.output.test, p.n_val, p.n_test, p.seed)  # noqa: F821
