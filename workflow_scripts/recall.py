from _common import finish, init

init(snakemake)
from clusterucb.pipeline.quality import recall

i, o = snakemake.input, snakemake.output
recall(
    selection=i.selection,
    draws=i.draws,
    scores_path=i.scores,
    assignments=i.assignments,
    recall_out=o.recall,
    arms_out=o.arms,
    top_p=snakemake.params.top_p,
)
finish()
