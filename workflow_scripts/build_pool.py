from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.data import build_pool_table  # noqa: E402

p = snakemake.params  # noqa: F821
build_pool_table(
    sources=p.sources, datasets_dir=p.datasets_dir, decontamination_files=list(snakemake.input.decontamination),  # noqa: F821
    out=snakemake.output[0], seed=p.seed, on_malformed=p.on_malformed,  # noqa: F821
)
finish()
