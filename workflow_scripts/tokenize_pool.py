from _common import init, model_dir

init(snakemake)  # noqa: F821
from clusterucb.pipeline.data import tokenize_pool  # noqa: E402

p = snakemake.params  # noqa: F821
tokenize_pool(snakemake.input.pool, model_dir(snakemake.input.model), snakemake.output[0], p.max_length, p.chat_template, p.overlong, p.on_unusable, workers=snakemake.threads, scratch=p.scratch)  # noqa: F821
