from _common import finish, init

init(snakemake)
from clusterucb.pipeline.quality import quality_sweep

i, o, p = snakemake.input, snakemake.output, snakemake.params
quality_sweep(
    scores_path=i.scores,
    assignment_paths=list(i.assignments),
    grid=p.grid,
    top_p=p.top_p,
    seed=p.seed,
    out=o.sweep,
    clusters_out=o.clusters,
    prior_path=i.get("prior"),
    static_path=i.static,
    warmup_manifest=i.get("warmup"),
)
finish()
