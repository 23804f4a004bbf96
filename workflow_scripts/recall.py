from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.quality import recall  # noqa: E402

i, o = snakemake.input, snakemake.output  # noqa: F821
recall(i.selection, i.draws, i.scores, i.assignments, o.recall, o.arms, snakemake.params.top_p)  # noqa: F821
finish()
