from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.scores import full_scores  # noqa: E402

i = snakemake.input  # noqa: F821
full_scores(i.manifest, i.val_tensors, i.val_index, i.val_tokens, snakemake.output[0])  # noqa: F821
finish()
