from _common import finish, init, throughput

init(snakemake)  # noqa: F821
from clusterucb.pipeline.cluster import cluster  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
k = int(snakemake.wildcards.k)  # noqa: F821
cluster(i.manifest, o.assignments, o.centroids, k, p.max_iter, p.init, p.backend, p.seed, p.center, p.remove_components, p.restarts, **throughput(snakemake, "cluster"))  # noqa: F821
finish()
