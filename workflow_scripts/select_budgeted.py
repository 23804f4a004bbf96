from _common import checkpoint_dir, init, model_dir

init(snakemake)  # noqa: F821
from clusterucb.pipeline.reselect import select_budgeted  # noqa: E402

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards  # noqa: F821
select_budgeted(
    model_dir(i.model), checkpoint_dir(i.adapter), i.pool, i.val_tensors, i.val_index, i.val_tokens, i.assignments,
    o.selection, o.draws, p.grads, p.run, p.top_p, w.task, w.run, int(w.epoch),
)
