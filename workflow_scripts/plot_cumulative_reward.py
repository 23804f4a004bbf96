from _common import finish, init

init(snakemake)
from clusterucb.pipeline.report import cumulative_reward_figure

cumulative_reward_figure(
    draw_paths=list(snakemake.input),
    out=snakemake.output[0],
)
finish()
