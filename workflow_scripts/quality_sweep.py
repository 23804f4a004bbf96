from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.quality import quality_sweep  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
quality_sweep(
    scores_path=i.scores, assignment_paths=list(i.assignments), grid=p.grid, top_p=p.top_p, seed=p.seed,
    out=o.sweep, clusters_out=o.clusters, prior_path=i.get("prior"), static_path=i.static,
)
finish()
