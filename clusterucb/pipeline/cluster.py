"""Stage: cosine k-means of the warmup-checkpoint pool features."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from clusterucb.features.gradstore import GradientStore
from clusterucb.infra.devices import device
from clusterucb.infra.io import save_safetensors, write_parquet
from clusterucb.selection.kmeans import spherical_kmeans

log = logging.getLogger(__name__)


def cluster(
    *,
    manifest: str,
    assignments_out: str,
    centroids_out: str,
    k: int,
    max_iter: int,
    init: str,
    backend: str,
    seed: int,
    center: bool = False,
    remove_components: int = 0,
    restarts: int = 1,
    cache_mb: float = 0,
) -> None:
    """k-means streamed over the memory-mapped shards of the warmup features (kept in memory after
    the first pass when they fit in ``cache_mb``)."""
    store = GradientStore(manifest)
    parts = store.shard_features()
    ids = [i for part_ids, _ in parts for i in part_ids]
    if store.failures():
        log.warning("%d pool samples have no warmup gradient and are left out of the clusters", len(store.failures()))
    result = spherical_kmeans(
        [features for _, features in parts],
        k,
        seed,
        max_iter=max_iter,
        init=init,
        backend=backend,
        device=device(),
        center=center,
        remove_components=remove_components,
        restarts=restarts,
        cache_mb=cache_mb,
    )
    counts = np.bincount(result.labels.numpy(), minlength=k)
    meta = {
        "k": k,
        "seed": seed,
        "init": init,
        "backend": backend,
        "center": center,
        "remove_components": remove_components,
        "restarts": restarts,
        "n_iter": result.n_iter,
        "converged": result.converged,
        "reseeded": result.reseeded,
        "empty_clusters": int((counts == 0).sum()),
        "features": store.meta,
    }
    table = pa.table(
        {
            "example_id": ids,
            "cluster": pa.array(result.labels.numpy(), pa.int32()),
            "similarity": pa.array(result.similarity.numpy(), pa.float32()),
        },
        schema=pa.schema(
            [
                pa.field("example_id", pa.string(), nullable=False),
                pa.field("cluster", pa.int32(), nullable=False),
                pa.field("similarity", pa.float32()),
            ]
        ),
    )
    write_parquet(table, assignments_out, meta)
    save_safetensors({"centroids": result.centroids, "sizes": torch.as_tensor(counts)}, centroids_out, meta)
    log.info(
        "clusters: K=%d, sizes min/median/max %d/%d/%d, %d empty",
        k,
        counts.min(),
        int(np.median(counts)),
        counts.max(),
        int((counts == 0).sum()),
    )
