from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)
from clusterucb.pipeline.train import less_warmup

i, o, p = snakemake.input, snakemake.output, snakemake.params
less_warmup(
    model_dir=model_dir(i.model),
    pool_tokens=i.pool,
    adapter_dirs=[str(Path(a).parent) for a in o.adapters],
    optimizer_outs=list(o.optimizers),
    log_out=o.train_log,
    lora=p.lora,
    train={**p.train, **throughput(snakemake, "train"), **throughput(snakemake, "precision")},
    less=p.less,
    seed=p.seed,
    scratch=p.scratch,
)
finish()
