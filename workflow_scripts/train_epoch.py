from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)
from clusterucb.pipeline.files import Checkpoint, TrainingOutputs
from clusterucb.pipeline.train import train_epoch

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards
epoch = int(w.epoch)
train_epoch(
    model_dir=model_dir(i.model),
    pool_tokens=i.pool,
    selection=i.selection,
    previous=Checkpoint(str(Path(i.prev_adapter).parent), i.prev_optimizer) if epoch > 1 else None,
    out=TrainingOutputs(str(Path(o.adapter).parent), o.optimizer, o.train_log),
    lora=p.lora,
    train={**p.train, **throughput(snakemake, "train"), **throughput(snakemake, "precision")},
    epoch=epoch,
    top_p=p.top_p,
    seed=p.seed,
    lora_init_seed=p.lora_init_seed,
    scratch=p.scratch,
)
finish()
