from _common import finish, init

init(snakemake)
from clusterucb.pipeline.data import build_pool_table

p = snakemake.params
build_pool_table(
    sources=p.sources,
    datasets_dir=p.datasets_dir,
    decontamination_files=list(snakemake.input.decontamination),
    out=snakemake.output[0],
    seed=p.seed,
    on_malformed=p.on_malformed,
)
finish()
