from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)
from clusterucb.pipeline.train import train_epoch

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards
epoch = int(w.epoch)
prev_adapter = str(Path(i.prev_adapter).parent) if epoch > 1 else None
prev_optimizer = i.prev_optimizer if epoch > 1 else None
train_epoch(
    model_dir=model_dir(i.model),
    pool_tokens=i.pool,
    selection=i.selection,
    prev_adapter_dir=prev_adapter,
    prev_optimizer=prev_optimizer,
    adapter_dir=str(Path(o.adapter).parent),
    optimizer_out=o.optimizer,
    log_out=o.train_log,
    lora=p.lora,
    train={**p.train, **throughput(snakemake, "train"), **throughput(snakemake, "precision")},
    epoch=epoch,
    epochs=p.train["epochs"],
    top_p=p.top_p,
    seed=p.seed,
    scratch=p.scratch,
)
finish()
