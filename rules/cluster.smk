# Cosine k-means of the warmup-checkpoint pool features (computed once, shared by every later epoch).


rule kmeans:
    input:
        manifest="results/grads/warmup/pool/manifest.parquet",
        shards=get_pool_shards()["tensors"],
    output:
        assignments="results/cluster/assignments.parquet",
        centroids="results/cluster/centroids.safetensors",
    log:
        "logs/kmeans.log",
    benchmark:
        "results/benchmarks/kmeans.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb_heavy,
        runtime=runtime_heavy,
    params:
        k=config["cluster"]["k"],
        max_iter=config["cluster"]["max_iter"],
        init=config["cluster"]["init"],
        backend=config["cluster"]["backend"],
        seed=config["seed"],
    script:
        "../workflow_scripts/kmeans.py"
