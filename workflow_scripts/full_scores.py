from _common import finish, init

init(snakemake)
from clusterucb.pipeline.scores import full_scores

i = snakemake.input
full_scores(
    manifest=i.manifest,
    val_tensors=i.val_tensors,
    val_index=i.val_index,
    val_tokens=i.val_tokens,
    out=snakemake.output[0],
)
finish()
