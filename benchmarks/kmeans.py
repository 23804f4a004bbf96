"""Spherical k-means: ours (clusterucb.selection.kmeans) against faiss and scikit-learn on the same unit-norm features.

    pip install -e ".[bench]"                                        # faiss-cpu and scikit-learn: required, never skipped
    python benchmarks/kmeans.py                                      # N = 20k, 100k x d = 8192, 2048; K = 150; 20 iterations
    python benchmarks/kmeans.py --sizes 5000:2048 --no-pykeops       # quick check (about a minute on 2 cores)
    python benchmarks/kmeans.py --sizes 20000:2048 --repeats 3 --threads 2
    python benchmarks/kmeans.py --store results/grads/warmup/pool --sizes 20000:0   # a run's real features (d is the store's)

Every method clusters the same float32 unit rows into K clusters from the same
initial centroids (our k-means++ seeding, computed once per size and not timed)
for at most ``--iters`` Lloyd iterations, with torch, faiss (OpenMP) and the BLAS
/ OpenMP pools limited to ``--threads``:

- ours[torch], ours[faiss]: ``spherical_kmeans(..., init=<the shared centroids>,
  backend=...)``, our Lloyd loop (streamed row blocks, re-normalised every pass;
  stops early when no label changes) with the assignment by a torch GEMM or by
  ``faiss.knn``. "ours" in the summary is the backend ``auto`` picks on CPU here;
- ours[pykeops]: the same loop with the KeOps assignment, when it builds (a failure
  to build is printed, not hidden). KeOps is slow on CPU at these d: ``--no-pykeops``
  skips it;
- faiss: ``faiss.Clustering`` with ``spherical=True`` (unit centroids after every
  update) and an inner-product index, every point used (no subsampling to 256 per
  centroid), always ``--iters`` iterations; faiss splits a large cluster to fill an
  empty one where we re-seed it with the worst-fitted point;
- sklearn: ``KMeans(algorithm="lloyd", n_init=1, tol=0)``. It is Euclidean, not
  spherical: on unit rows its assignment equals the max-cosine one, but its
  centroids are plain means, not renormalised, so each iteration's assignment can
  differ from a spherical one's (its result is still scored as below).

Each method first runs one untimed iteration on a small slice (thread pools,
BLAS, the KeOps compilation for this d). s/iter: wall time of the call given the
initial centroids, divided by the
iterations it ran (ours and sklearn also make one more assignment pass than
iterations, for labels that match the final centroids; their O(N*d) input checks
are included too). Cosine inertia: computed here, the same way for every method,
from its final centroids: each row assigned to its max-cosine normalised
centroid, the mean of those cosines (higher is better).

The last line compares ours with the faster of faiss and sklearn ("the fastest
other library") at the largest size (N*d):
``kmeans_vs_fastest=<ours s/iter / fastest s/iter> inertia_gap=<(best other inertia - ours) / best other>``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from clusterucb.selection.kmeans import RowBlocks, kmeans_plusplus, resolve_backend, spherical_kmeans

REFERENCES = {"faiss": "faiss-cpu", "sklearn": "scikit-learn"}  # module -> package
OURS = resolve_backend("auto", torch.device("cpu"))  # what the workflow's default (cluster.backend: auto) runs on CPU


def require_references() -> None:
    missing = []
    for module, package in REFERENCES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        sys.exit(f'benchmarks/kmeans.py compares against {" and ".join(missing)}, not installed: pip install -e ".[bench]"')


def synthetic_features(n: int, d: int, k: int, seed: int, chunk: int = 8192) -> torch.Tensor:
    """Unit rows of a seeded Gaussian mixture with 2K components of uneven sizes.

    The component centres come in K/10 correlated groups and each point has
    cosine ~0.45 to its centre, so the K clusters overlap and Lloyd does not
    settle in a couple of iterations (as real gradient features do not).
    """
    g = torch.Generator().manual_seed(seed)
    groups = F.normalize(torch.randn(max(k // 10, 1), d, generator=g), dim=1)
    centres = F.normalize(groups[torch.arange(2 * k) % len(groups)] + F.normalize(torch.randn(2 * k, d, generator=g), dim=1), dim=1)
    weights = torch.rand(2 * k, generator=g) + 0.2
    members = torch.multinomial(weights, n, replacement=True, generator=g)
    x = torch.randn(n, d, generator=g).mul_(2.0 / d**0.5)  # noise of norm ~2
    for lo in range(0, n, chunk):  # in place, in chunks: no second N x d copy
        x[lo : lo + chunk] += centres[members[lo : lo + chunk]]
    return x.div_(x.norm(dim=1, keepdim=True))


def store_features(store_dir: str, n: int) -> torch.Tensor:
    """The first ``n`` successful rows of a gradient store (a folder holding manifest.parquet), unit-norm float32."""
    from clusterucb.features.gradstore import GradientStore

    parts, rows = [], 0
    for _, features in GradientStore(os.path.join(store_dir, "manifest.parquet")).shard_features():
        parts.append(features[: n - rows].float())
        rows += len(parts[-1])
        if rows >= n:
            break
    return F.normalize(torch.cat(parts), dim=1)


def cosine_inertia(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> float:
    """Mean over rows of the cosine to the nearest normalised centroid (the same score for every method)."""
    c = F.normalize(torch.as_tensor(centroids, dtype=torch.float32), dim=1)
    total = sum(float((x[lo : lo + chunk] @ c.T).max(dim=1).values.double().sum()) for lo in range(0, len(x), chunk))
    return total / len(x)


def run_ours(x, init, iters, backend, cache_mb):
    result = spherical_kmeans(x, len(init), seed=0, max_iter=iters, init=init, backend=backend, cache_mb=cache_mb)
    return result.centroids, result.n_iter


def run_faiss(x, init, iters):
    import faiss

    params = faiss.ClusteringParameters()
    params.niter, params.spherical, params.nredo = iters, True, 1
    params.max_points_per_centroid = len(x)  # cluster every point, as the others do (default: subsample to 256 per centroid)
    params.min_points_per_centroid = 1
    clustering = faiss.Clustering(x.shape[1], len(init), params)
    faiss.copy_array_to_vector(init.numpy().ravel(), clustering.centroids)  # used as the first centroids
    clustering.train(x.numpy(), faiss.IndexFlatIP(x.shape[1]))
    centroids = faiss.vector_float_to_array(clustering.centroids).reshape(len(init), -1)
    return centroids, clustering.iteration_stats.size()


def run_sklearn(x, init, iters):
    from sklearn.cluster import KMeans

    kmeans = KMeans(len(init), init=init.numpy(), n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(x.numpy())
    return kmeans.cluster_centers_, kmeans.n_iter_


def timed(fn, *args, repeats: int = 1):
    """(centroids, iterations, best wall seconds over ``repeats`` calls)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        centroids, n_iter = fn(*args)
        best = min(best, time.perf_counter() - start)
    return centroids, n_iter, best


def bench_size(x: torch.Tensor, k: int, args) -> dict[str, dict]:
    start = time.perf_counter()
    init = kmeans_plusplus(RowBlocks(x, torch.device("cpu"), cache_mb=args.cache_mb), k, np.random.default_rng(args.seed))
    print(
        f"\nN={len(x)} d={x.shape[1]} K={k} iters<={args.iters} threads={args.threads} (shared k-means++ seeding {time.perf_counter() - start:.1f} s, not timed)"
    )
    methods = {
        "ours[torch]": partial(run_ours, backend="torch", cache_mb=args.cache_mb),
        "ours[faiss]": partial(run_ours, backend="faiss", cache_mb=args.cache_mb),
        "faiss": run_faiss,
        "sklearn": run_sklearn,
    }
    if not args.no_pykeops:
        methods["ours[pykeops]"] = partial(run_ours, backend="pykeops", cache_mb=args.cache_mb)
    results = {}
    for name, run in methods.items():
        try:  # untimed warm-up on a small slice: thread pools, BLAS, and for pykeops the compilation for this d
            run(x[: 4 * k], init, 1)
        except Exception as error:
            if name != "ours[pykeops]":
                raise
            print(f"  ours[pykeops]: failed to build ({type(error).__name__}: {str(error).splitlines()[0][:200]}); not measured")
            continue
        centroids, n_iter, seconds = timed(run, x, init, args.iters, repeats=args.repeats)
        results[name] = {
            "iters": n_iter,
            "s_per_iter": seconds / max(n_iter, 1),
            "seconds": seconds,
            "inertia": cosine_inertia(x, centroids),
        }
    ours = results[f"ours[{OURS}]"]
    print(f"  ours = ours[{OURS}], the backend spherical_kmeans(backend='auto') picks on CPU here")
    print(f"  {'method':14s} {'iters':>5s} {'s/iter':>8s} {'total s':>8s} {'cos inertia':>11s} {'time/ours':>9s} {'inertia vs ours':>15s}")
    for name, r in results.items():
        print(
            f"  {name:14s} {r['iters']:5d} {r['s_per_iter']:8.3f} {r['seconds']:8.2f} {r['inertia']:11.5f} "
            f"{r['s_per_iter'] / ours['s_per_iter']:8.2f}x {(r['inertia'] - ours['inertia']) / ours['inertia']:+15.2%}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000:8192,20000:2048,100000:8192,100000:2048", help="comma-separated N:d")
    parser.add_argument("--k", type=int, default=150)
    parser.add_argument(
        "--cache-mb", type=float, default=16384, help="ours: cluster.cache_mb (the workflow default; 0 = stream every pass)"
    )
    parser.add_argument("--iters", type=int, default=20, help="Lloyd iterations (at most, for ours and sklearn)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch, faiss and BLAS/OpenMP threads")
    parser.add_argument("--repeats", type=int, default=1, help="time each method this many times, keep the fastest")
    parser.add_argument("--seed", type=int, default=0, help="features and seeding")
    parser.add_argument(
        "--store", help="a gradient store folder (holds manifest.parquet): cluster its first N rows instead of synthetic ones"
    )
    parser.add_argument("--no-pykeops", action="store_true", help="leave out ours[pykeops] (slow on CPU at large d)")
    args = parser.parse_args()
    require_references()

    import faiss
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in size.split(":")) for size in args.sizes.split(",") if size]
    by_size = {}
    with threadpool_limits(limits=args.threads):
        for n, d in sizes:
            x = store_features(args.store, n) if args.store else synthetic_features(n, d, args.k, args.seed)
            by_size[len(x) * x.shape[1]] = bench_size(x, args.k, args)
            del x

    largest = by_size[max(by_size)]
    fastest = min(REFERENCES, key=lambda name: largest[name]["s_per_iter"])
    best_inertia = max(largest[name]["inertia"] for name in REFERENCES)
    print(f"\nfastest other library at the largest size: {fastest}")
    ours = largest[f"ours[{OURS}]"]
    print(
        f"kmeans_vs_fastest={ours['s_per_iter'] / largest[fastest]['s_per_iter']:.3f} inertia_gap={(best_inertia - ours['inertia']) / best_inertia:.2e}"
    )


if __name__ == "__main__":
    main()
