from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)
from clusterucb.infra import paths
from clusterucb.pipeline.files import Checkpoint, Pool, Selecting, Validation
from clusterucb.pipeline.reselect import select_budgeted

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards
select_budgeted(
    model_dir=model_dir(i.model),
    at=Checkpoint(str(Path(i.adapter).parent), i.optimizer, paths.checkpoint_dir(paths.checkpoint_of(i.adapter))),
    validation=Validation(i.val_tensors, i.val_index, i.val_tokens),
    pool=Pool(i.pool, i.pool_table),
    arms=i.arms,
    prior=i.get("prior"),
    selecting=Selecting(w.task, w.run, int(w.epoch)),
    run_params=p.run,
    grad_params={**p.grads, **throughput(snakemake, "gradients"), **throughput(snakemake, "precision")},
    top_p=p.top_p,
    selection_out=o.selection,
    draws_out=o.draws,
    scratch=p.scratch,
)
finish()
