from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.data import build_pool_table  # noqa: E402

p = snakemake.params  # noqa: F821
build_pool_table(p.sources, p.datasets_dir, list(snakemake.input.decontamination), snakemake.output[0], p.seed, p.on_malformed)  # noqa: F821
finish()
