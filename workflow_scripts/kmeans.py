from _common import finish, init, throughput

init(snakemake)
from clusterucb.pipeline.cluster import cluster

i, o, p = snakemake.input, snakemake.output, snakemake.params
k = int(snakemake.wildcards.k)
cluster(
    manifest=i.manifest,
    assignments_out=o.assignments,
    centroids_out=o.centroids,
    k=k,
    max_iter=p.max_iter,
    init=p.init,
    backend=p.backend,
    seed=p.seed,
    center=p.center,
    remove_components=p.remove_components,
    restarts=p.restarts,
    **throughput(snakemake, "cluster"),
)
finish()
