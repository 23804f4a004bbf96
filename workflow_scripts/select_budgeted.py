from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)  # noqa: F821
from clusterucb import paths  # noqa: E402
from clusterucb.pipeline.reselect import select_budgeted  # noqa: E402

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards  # noqa: F821
select_budgeted(
    model_dir(i.model), str(Path(i.adapter).parent), i.optimizer, paths.checkpoint_dir(paths.checkpoint_of(i.adapter)), i.pool, i.val_tensors, i.val_index, i.val_tokens, i.arms,
    o.selection, o.draws, {**p.grads, **throughput(snakemake, "gradients"), **throughput(snakemake, "precision")}, p.run, p.top_p, w.task, w.run, int(w.epoch), p.scratch,  # noqa: F821
)
finish()
