from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)  # noqa: F821
from clusterucb.pipeline.train import warmup  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
warmup(model_dir(i.model), i.pool, str(Path(o.adapter).parent), o.optimizer, o.train_log, p.lora, {**p.train, **throughput(snakemake, "train"), **throughput(snakemake, "precision")}, p.steps, p.train["epochs"], p.seed, p.scratch)
finish()
