from pathlib import Path

from _common import finish, init

init(snakemake)
from clusterucb.pipeline.model import build_builtin_model

p = snakemake.params
build_builtin_model(
    pool_path=snakemake.input.pool,
    out_dir=str(Path(snakemake.output.weights).parent),
    sizes=p.sizes,
    pretrain_params=p.pretrain,
    seed=p.seed,
)
finish()
