from pathlib import Path

from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.model import build_builtin_model  # noqa: E402

p = snakemake.params  # noqa: F821
build_builtin_model(snakemake.input.pool, str(Path(snakemake.output.weights).parent), p.sizes, p.pretrain, p.seed)  # noqa: F821
finish()
