from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)
from clusterucb.infra import paths
from clusterucb.pipeline.reselect import select_budgeted

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards
select_budgeted(
    model_dir=model_dir(i.model),
    adapter_dir=str(Path(i.adapter).parent),
    optimizer_path=i.optimizer,
    checkpoint=paths.checkpoint_dir(paths.checkpoint_of(i.adapter)),
    pool_tokens=i.pool,
    val_tensors=i.val_tensors,
    val_index=i.val_index,
    val_tokens=i.val_tokens,
    arms=i.arms,
    selection_out=o.selection,
    draws_out=o.draws,
    grad_params={**p.grads, **throughput(snakemake, "gradients"), **throughput(snakemake, "precision")},
    run_params=p.run,
    top_p=p.top_p,
    task=w.task,
    run=w.run,
    epoch=int(w.epoch),
    pool_table=i.pool_table,
    prior=i.get("prior"),
    scratch=p.scratch,
)
finish()
