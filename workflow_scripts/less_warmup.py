from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)  # noqa: F821
from clusterucb.pipeline.train import less_warmup  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
less_warmup(
    model_dir(i.model), i.pool, [str(Path(a).parent) for a in o.adapters], list(o.optimizers), o.train_log,
    p.lora, {**p.train, **throughput(snakemake, "train"), **throughput(snakemake, "precision")}, p.less, p.seed, p.scratch,
)
finish()
