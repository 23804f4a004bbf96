from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.report import cumulative_reward_figure  # noqa: E402

cumulative_reward_figure(list(snakemake.input), snakemake.output[0])  # noqa: F821
finish()
