from _common import finish, init, model_dir

init(snakemake)
from clusterucb.pipeline.data import tokenize_target

p = snakemake.params
tokenize_target(
    val_path=snakemake.input.val,
    model_dir=model_dir(snakemake.input.model),
    out=snakemake.output[0],
    max_length=p.max_length,
    chat_template=p.chat_template,
)
finish()
