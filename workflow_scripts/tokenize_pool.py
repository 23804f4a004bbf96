from _common import finish, init, model_dir

# The guard matters: tokenize_pool's spawn workers re-import this file as __mp_main__, and must not
# tokenize the pool (and open the log) again themselves.
if __name__ == "__main__":
    init(snakemake)  # noqa: F821
    from clusterucb.pipeline.data import tokenize_pool

    p = snakemake.params  # noqa: F821
    tokenize_pool(snakemake.input.pool, model_dir(snakemake.input.model), snakemake.output[0], p.max_length, p.chat_template, p.overlong, p.on_unusable, workers=snakemake.threads, scratch=p.scratch)  # noqa: F821
    finish()
