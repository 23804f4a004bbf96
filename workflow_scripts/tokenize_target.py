from _common import finish, init, model_dir

init(snakemake)  # noqa: F821
from clusterucb.pipeline.data import tokenize_target  # noqa: E402

p = snakemake.params  # noqa: F821
tokenize_target(snakemake.input.val, model_dir(snakemake.input.model), snakemake.output[0], p.max_length, p.chat_template)  # noqa: F821
finish()
