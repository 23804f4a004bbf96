from _common import finish, init, model_dir

# The guard matters: tokenize_pool's spawn workers re-import this file as __mp_main__, and must not
# tokenize the pool (and open the log) again themselves.
if __name__ == "__main__":
    init(snakemake)
    from clusterucb.pipeline.data import tokenize_pool

    p = snakemake.params
    tokenize_pool(
        pool_path=snakemake.input.pool,
        model_dir=model_dir(snakemake.input.model),
        out=snakemake.output[0],
        max_length=p.max_length,
        chat_template=p.chat_template,
        overlong=p.overlong,
        on_unusable=p.on_unusable,
        workers=snakemake.threads,
        scratch=p.scratch,
    )
    finish()
