from _common import init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.cluster import cluster  # noqa: E402

i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
cluster(i.manifest, o.assignments, o.centroids, int(snakemake.wildcards.k), p.max_iter, p.init, p.backend, p.seed)  # noqa: F821
