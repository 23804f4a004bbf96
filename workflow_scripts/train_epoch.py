from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)  # noqa: F821
from clusterucb.pipeline.train import train_epoch  # noqa: E402

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards  # noqa: F821
epoch = int(w.epoch)
prev_adapter = str(Path(i.prev_adapter).parent) if epoch > 1 else None
prev_optimizer = i.prev_optimizer if epoch > 1 else None
train_epoch(
    model_dir(i.model), i.pool, i.selection, prev_adapter, prev_optimizer,
    str(Path(o.adapter).parent), o.optimizer, o.train_log,
    p.lora, {**p.train, **throughput(snakemake, "train"), **throughput(snakemake, "precision")}, epoch, p.train["epochs"], p.top_p, p.seed, p.scratch,
)
finish()
