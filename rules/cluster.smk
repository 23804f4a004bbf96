# Cosine k-means of the warmup-checkpoint pool features (once per k, shared by every target, run and epoch).
# It computes on the job's GPU when there is one (clusterucb.infra.devices.device), so it asks for one.


rule kmeans:
    input:
        manifest=paths.POOL_MANIFEST.format(ckpt="warmup"),
        shards=get_warmup_shards(),
    output:
        assignments=paths.ASSIGNMENTS,
        centroids=paths.CENTROIDS,
    log:
        "logs/kmeans/k-{k}.log",
    benchmark:
        "results/benchmarks/kmeans/k-{k}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb_kmeans,
        runtime=runtime_heavy,
    params:
        max_iter=config["cluster"]["max_iter"],
        init=config["cluster"]["init"],
        backend=config["cluster"]["backend"],
        center=config["cluster"]["center"],
        remove_components=config["cluster"]["remove_components"],
        restarts=config["cluster"]["restarts"],
        seed=config["seed"],
    script:
        "../workflow_scripts/kmeans.py"
