"""Spherical (cosine) k-means on unit-norm gradient features.

Fixes over the official KeOps loop (spec §10.14): k-means++ seeding from an
explicit seed, empty clusters re-seeded with the worst-fitted point, early
stop when no assignment changes, and returned labels that are consistent with
the returned centroids. The assignment step is a chunked GEMM (``torch``
backend, the fast one on CPU) or a KeOps reduction (``pykeops``, the paper's
choice; worth it on GPU only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class KMeansResult:
    labels: torch.Tensor  # (N,) int64, argmax cosine to ``centroids``
    centroids: torch.Tensor  # (K, D) float32, unit rows; a cluster may end with no member (callers drop it)
    similarity: torch.Tensor  # (N,) cosine of each point to its centroid
    n_iter: int
    converged: bool
    reseeded: int  # empty clusters re-seeded during the iterations


def _assign_torch(x: torch.Tensor, c: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.empty(len(x), dtype=torch.int64, device=x.device)
    best = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for start in range(0, len(x), chunk):
        sims = x[start : start + chunk] @ c.T
        best[start : start + chunk], labels[start : start + chunk] = sims.max(dim=1)
    return labels, best


def _assign_keops(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from pykeops.torch import LazyTensor

    x_i = LazyTensor(x[:, None, :].contiguous())
    c_j = LazyTensor(c[None, :, :].contiguous())
    labels = (x_i | c_j).argmax(dim=1).view(-1).long()
    best = (x * c[labels]).sum(1)
    return labels, best


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "pykeops" if device.type == "cuda" else "torch"
    if backend not in ("torch", "pykeops"):
        raise ValueError(f"unknown k-means backend {backend!r} (torch, pykeops or auto)")
    return backend


def kmeans_plusplus(x: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """k-means++ seeding with cosine distance 1 - cos (proportional to squared Euclidean on the sphere)."""
    n = len(x)
    first = int(rng.integers(n))
    centroids = [x[first]]
    dist = (1.0 - x @ x[first]).clamp_(min=0).double()
    for _ in range(1, k):
        total = float(dist.sum())
        if total <= 0:  # every point coincides with a centroid: pick uniformly
            index = int(rng.integers(n))
        else:
            probs = (dist / total).cpu().numpy()
            index = int(rng.choice(n, p=probs / probs.sum()))
        centroids.append(x[index])
        dist = torch.minimum(dist, (1.0 - x @ x[index]).clamp_(min=0).double())
    return torch.stack(centroids)


def spherical_kmeans(
    x: torch.Tensor,
    k: int,
    seed: int,
    max_iter: int = 20,
    init: str = "k-means++",
    backend: str = "torch",
) -> KMeansResult:
    """Cluster unit-norm rows of ``x`` into ``k`` cosine clusters."""
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected a non-empty (N, D) matrix, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or inf; failed samples must be excluded before clustering")
    if not 1 <= k <= len(x):
        raise ValueError(f"k={k} must be between 1 and the number of points ({len(x)})")
    x = F.normalize(x.float(), dim=1)
    assign = _assign_keops if resolve_backend(backend, x.device) == "pykeops" else _assign_torch
    rng = np.random.default_rng(seed)
    if init == "k-means++":
        centroids = kmeans_plusplus(x, k, rng)
    elif init == "random":  # the official code's uniform init
        centroids = x[torch.as_tensor(rng.choice(len(x), size=k, replace=False))].clone()
    else:
        raise ValueError(f"unknown init {init!r} (k-means++ or random)")

    labels, best = assign(x, centroids)
    reseeded, converged, it = 0, False, 0
    for it in range(1, max_iter + 1):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            # Re-seed each empty cluster with the point that fits its centroid worst.
            worst = torch.argsort(best)[: len(empty)]
            for cluster, point in zip(empty, worst.tolist()):
                sums[cluster] = x[point]
            reseeded += len(empty)
        centroids = F.normalize(sums, dim=1)
        new_labels, best = assign(x, centroids)
        changed = int((new_labels != labels).sum())
        labels = new_labels
        if changed == 0 and not empty:
            converged = True
            break
    log.info("k-means: K=%d, %d iterations, converged=%s, %d empty clusters re-seeded, mean cos %.4f", k, it, converged, reseeded, float(best.mean()))
    return KMeansResult(labels, centroids, best, it, converged, reseeded)
