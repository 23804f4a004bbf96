from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)
from clusterucb.pipeline.train import warmup

i, o, p = snakemake.input, snakemake.output, snakemake.params
warmup(
    model_dir=model_dir(i.model),
    pool_tokens=i.pool,
    adapter_dir=str(Path(o.adapter).parent),
    optimizer_out=o.optimizer,
    log_out=o.train_log,
    lora=p.lora,
    train={**p.train, **throughput(snakemake, "train"), **throughput(snakemake, "precision")},
    steps=p.steps,
    epochs=p.train["epochs"],
    seed=p.seed,
    scratch=p.scratch,
)
finish()
