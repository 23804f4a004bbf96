"""Spherical (cosine) k-means on unit-norm gradient features.

Fixes over the official KeOps loop (spec §10.14): k-means++ seeding from an
explicit seed, empty clusters re-seeded with the worst-fitted point, early
stop when no assignment changes, and returned labels that are consistent with
the returned centroids. The assignment step of each row block is a GEMM
(``torch``), a KeOps reduction (``pykeops``, the paper's choice; worth it on GPU
only) or ``faiss.knn`` (``faiss``, CPU only, needs faiss-cpu: faster than the
torch GEMM on CPU in benchmarks/kmeans.py). Only the assignment is delegated:
seeding, restarts, preprocessing, empty-cluster re-seeding and the result are
the same whatever the backend (faiss's own Lloyd loop would split clusters
instead of re-seeding them, and needs every row in memory as float32).

On a GPU ``auto`` is the torch GEMM: at K ~ 150 the (rows x K) similarity
block is small, one cuBLAS GEMM per block of 16k rows, and it needs nothing
compiled at run time. KeOps (``backend: pykeops``, asked for by name) compiles
its kernels at run time (nvrtc and the CUDA headers must be present) into a
cache folder; each call here gets a folder of its own, removed afterwards, so
concurrent k-means jobs (one per K) never compile into the same one.
``benchmarks/gpu_check.py`` times the two at d = 8192 where KeOps imports.
On CUDA the whole loop runs in PyTorch's deterministic mode: the per-cluster
sums (``index_add_``) add in a fixed order, so the clusters repeat bit for bit.

The features can be one tensor or a list of row blocks (e.g. memory-mapped
shards in fp16/bf16): every pass streams over blocks of ``chunk`` rows,
converting them to float32 on the compute device, so the store never has to
be loaded into memory as a whole.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clusterucb.infra.devices import deterministic_algorithms

log = logging.getLogger(__name__)
KEOPS_CACHE_ENV = "CLUSTERUCB_KEOPS_CACHE"  # where the per-job KeOps build folders go (default: $TMPDIR)


@dataclass
class KMeansResult:
    labels: torch.Tensor  # (N,) int64, argmax cosine to ``centroids``
    centroids: torch.Tensor  # (K, D) float32, unit rows; a cluster may end with no member (callers drop it)
    similarity: torch.Tensor  # (N,) cosine of each point to its centroid
    n_iter: int
    converged: bool
    reseeded: int  # empty clusters re-seeded during the iterations


class RowBlocks:
    """Rows of one or several 2-D tensors, read block by block as unit-norm float32 on ``device``.

    With a :class:`Preprocess`, each unit row is centred (the mean unit row
    subtracted) and/or has its top principal directions projected out, then is
    normalised again: the clustering then sees what distinguishes samples, not a
    direction they all share.
    """

    def __init__(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        device: torch.device,
        chunk: int = 16384,
        preprocess: Preprocess | None = None,
        cache_mb: float = 0,
    ):
        self.parts = [x] if isinstance(x, torch.Tensor) else list(x)
        if not self.parts or any(p.ndim != 2 for p in self.parts) or len({p.shape[1] for p in self.parts}) != 1:
            raise ValueError("expected one or more (rows, D) matrices with the same D")
        self.device, self.chunk = device, chunk
        self.n = sum(p.shape[0] for p in self.parts)
        self.dim = self.parts[0].shape[1]
        self.preprocess = preprocess
        # Prepared (unit, preprocessed, float32) blocks kept after the first pass when they fit in
        # ``cache_mb``: the same tensors the streamed pass computes, so the results do not change; every
        # later pass is then one GEMM per block instead of a read + convert + normalise + project.
        self.cache_mb = cache_mb
        self._cache: list[tuple[int, torch.Tensor]] | None = None

    @property
    def prepared_mb(self) -> float:
        return self.n * self.dim * 4 / 2**20

    def _prepared(self, unit_rows: torch.Tensor) -> torch.Tensor:
        """Unit rows after the preprocessing, unit again (the rows themselves without one)."""
        if self.preprocess is None:
            return unit_rows
        return F.normalize(self.preprocess.apply(unit_rows), dim=-1)

    def raw_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Unit-norm rows before the preprocessing."""
        start = 0
        for part in self.parts:
            for lo in range(0, part.shape[0], self.chunk):
                block = part[lo : lo + self.chunk].to(self.device, torch.float32)
                norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
                # A NaN or inf entry makes its row's norm non-finite: checking the N norms, and the N x D
                # entries only then, saves a full pass per block on every Lloyd iteration (benchmarks/kmeans.py).
                if not torch.isfinite(norms).all() and not torch.isfinite(block).all():
                    raise ValueError("features contain NaN or inf; failed samples must be excluded before clustering")
                yield start + lo, block / norms.clamp_min(1e-12)  # = F.normalize(block, dim=1)
            start += part.shape[0]

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self._cache is not None:
            yield from self._cache
            return
        keep = self.prepared_mb <= self.cache_mb
        kept = []
        for start, block in self.raw_blocks():
            block = self._prepared(block)
            if keep:
                kept.append((start, block))
            yield start, block
        if keep:
            self._cache = kept

    def raw_rows(self, indices: np.ndarray) -> torch.Tensor:
        """Unit-norm rows at sorted global ``indices``, before the preprocessing (one indexed read per part)."""
        out, start = [], 0
        for part in self.parts:
            local = indices[(indices >= start) & (indices < start + part.shape[0])] - start
            if len(local):
                out.append(part[torch.as_tensor(local)].to(self.device, torch.float32))
            start += part.shape[0]
        return F.normalize(torch.cat(out), dim=1)

    def row(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self._prepared(self.raw_rows(np.array([index]))[0])


@dataclass
class Preprocess:
    """x -> (x - mean) with the ``basis`` directions projected out (both optional), for unit rows x."""

    mean: torch.Tensor | None  # (D,)
    basis: torch.Tensor | None  # (D, c), orthonormal columns

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = x - self.mean.to(x.device)
        if self.basis is not None:
            basis = self.basis.to(x.device)
            x = x - (x @ basis) @ basis.T
        return x


def fit_preprocess(rows: RowBlocks, center: bool, remove_components: int, seed: int, sample: int = 20000) -> Preprocess | None:
    """The mean unit row (one streamed pass) and the top ``remove_components`` principal directions.

    The directions come from a seeded randomized SVD of at most ``sample`` rows
    (centred if ``center``), so the cost does not grow with the pool beyond one pass.
    """
    if not center and remove_components == 0:
        return None
    if remove_components and not 0 < remove_components < min(rows.n, rows.dim):
        raise ValueError(f"remove_components={remove_components} must be below min(N, D) = {min(rows.n, rows.dim)}")
    mean = None
    if center:
        total = torch.zeros(rows.dim, dtype=torch.float64)
        for _, block in rows.raw_blocks():
            total += block.double().sum(0).cpu()
        mean = (total / rows.n).float()
    basis = None
    if remove_components:
        picked = np.sort(np.random.default_rng(seed).choice(rows.n, size=min(sample, rows.n), replace=False))
        x = rows.raw_rows(picked).cpu()
        if mean is not None:
            x = x - mean
        generator_state = torch.random.get_rng_state()  # svd_lowrank draws from torch's global generator
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(x, q=remove_components + 10, niter=4)
        torch.random.set_rng_state(generator_state)
        basis = v[:, :remove_components].contiguous()
    return Preprocess(mean, basis)


def _assign_torch(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    best, labels = (x @ c.T).max(dim=1)
    return labels, best


@contextmanager
def keops_build_folder():
    """A fresh KeOps build folder for this call (under ``$CLUSTERUCB_KEOPS_CACHE``, default
    ``$TMPDIR/clusterucb-keops-<uid>``), removed on exit: KeOps has no lock around its cache, so jobs
    that share one can load each other's half-written kernels. ``KEOPS_CACHE_FOLDER`` is set before
    pykeops is imported (its import already compiles into that folder on a GPU)."""
    base = Path(os.environ.get(KEOPS_CACHE_ENV) or Path(tempfile.gettempdir()) / f"clusterucb-keops-{os.getuid()}")
    base.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"job-{os.getpid()}-", dir=base)
    previous = os.environ.get("KEOPS_CACHE_FOLDER")
    os.environ["KEOPS_CACHE_FOLDER"] = folder
    try:
        import pykeops

        pykeops.set_build_folder(folder)  # also when pykeops was imported earlier with another folder
        log.info("KeOps builds in %s (this job's own folder)", folder)
        yield folder
    finally:
        if previous is None:
            os.environ.pop("KEOPS_CACHE_FOLDER", None)
        else:
            os.environ["KEOPS_CACHE_FOLDER"] = previous
        shutil.rmtree(folder, ignore_errors=True)


def _assign_keops(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from pykeops.torch import LazyTensor

    x_i = LazyTensor(x[:, None, :].contiguous())
    c_j = LazyTensor(c[None, :, :].contiguous())
    labels = (x_i | c_j).argmax(dim=1).view(-1).long()
    best = (x * c[labels]).sum(1)
    return labels, best


def _assign_faiss(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss

    best, labels = faiss.knn(x.numpy(), c.numpy(), 1, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(labels[:, 0]), torch.from_numpy(best[:, 0])


def _faiss_importable() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


ASSIGN = {"torch": _assign_torch, "pykeops": _assign_keops, "faiss": _assign_faiss}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The assignment backend to use: ``auto`` is the fastest one available (benchmarks/kmeans.py).

    On GPU that is ``torch`` (a cuBLAS GEMM per row block; KeOps only when asked for by name);
    on CPU ``faiss`` when faiss is importable, else ``torch``.
    """
    if backend == "auto":
        if device.type == "cuda":
            return "torch"
        return "faiss" if _faiss_importable() else "torch"
    if backend not in ASSIGN:
        raise ValueError(f"unknown k-means backend {backend!r} ({', '.join(ASSIGN)} or auto)")
    if backend == "faiss":
        if device.type != "cpu":
            raise ValueError(f"the faiss k-means backend runs on CPU only (faiss-cpu), not on {device}: use torch or pykeops there")
        if not _faiss_importable():
            raise ImportError("the faiss k-means backend needs faiss: pip install faiss-cpu (or pick backend torch)")
    return backend


def kmeans_plusplus(rows: RowBlocks, k: int, rng: np.random.Generator) -> torch.Tensor:
    """k-means++ seeding with cosine distance 1 - cos (proportional to squared Euclidean on the sphere)."""
    chosen: list[torch.Tensor] = []
    dist = torch.full((rows.n,), math.inf, dtype=torch.float64)  # distance to the nearest chosen centroid
    index = int(rng.integers(rows.n))
    while True:
        chosen.append(rows.row(index))
        if len(chosen) == k:
            break
        for start, block in rows.blocks():
            piece = (1.0 - block @ chosen[-1]).clamp_(min=0).double().cpu()
            dist[start : start + len(block)] = torch.minimum(dist[start : start + len(block)], piece)
        total = float(dist.sum())
        if total <= 0:  # every point coincides with a centroid: pick uniformly
            index = int(rng.integers(rows.n))
        else:
            probs = (dist / total).numpy()
            index = int(rng.choice(rows.n, p=probs / probs.sum()))
    return torch.stack(chosen)


def spherical_kmeans(
    x: torch.Tensor | Sequence[torch.Tensor],
    k: int,
    seed: int,
    max_iter: int = 20,
    init: str | torch.Tensor = "k-means++",
    backend: str = "torch",
    device: str | torch.device | None = None,
    chunk: int = 16384,
    center: bool = False,
    remove_components: int = 0,
    restarts: int = 1,
    cache_mb: float = 0,
) -> KMeansResult:
    """Cluster the unit-norm rows of ``x`` (a tensor or a list of row blocks) into ``k`` cosine clusters.

    ``center`` / ``remove_components``: cluster the rows after subtracting their
    mean and projecting out their top principal directions (renormalised; see
    :class:`Preprocess`); the official code does neither. ``restarts``: run
    k-means that many times from seeds derived from ``seed`` and keep the run
    with the highest mean cosine to its centroid (the official code: one run).
    ``cache_mb``: keep the prepared float32 rows in memory after the first pass
    when they fit (N x D x 4 bytes); same result, every later pass a GEMM.
    ``init``: ``"k-means++"``, ``"random"`` (the official code's), or a (k, D)
    tensor of initial centroids in the space that is clustered (after any
    preprocessing), e.g. one seeding shared by several implementations in a
    benchmark; it allows a single run only.
    """
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    device = torch.device(device) if device is not None else (parts[0].device if parts else torch.device("cpu"))
    rows = RowBlocks(parts, device, chunk, cache_mb=cache_mb)
    if rows.n == 0:
        raise ValueError("expected a non-empty (N, D) matrix")
    if not 1 <= k <= rows.n:
        raise ValueError(f"k={k} must be between 1 and the number of points ({rows.n})")
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be at least 1")
    if isinstance(init, torch.Tensor) and (init.shape != (k, rows.dim) or restarts > 1):
        raise ValueError(
            f"initial centroids must be one ({k}, {rows.dim}) matrix (restarts=1), got {tuple(init.shape)} with restarts={restarts}"
        )
    resolved = resolve_backend(backend, device)
    assign = ASSIGN[resolved]
    best_result = None
    with deterministic_algorithms(device), keops_build_folder() if resolved == "pykeops" else nullcontext():
        rows.preprocess = fit_preprocess(rows, center, remove_components, seed)
        for attempt, run_seed in enumerate(np.random.SeedSequence(seed).generate_state(restarts) if restarts > 1 else [seed]):
            result = _lloyd(rows, k, int(run_seed), max_iter, init, assign)
            if restarts > 1:
                log.info("k-means restart %d/%d: mean cos %.4f", attempt + 1, restarts, float(result.similarity.mean()))
            if best_result is None or float(result.similarity.mean()) > float(best_result.similarity.mean()):
                best_result = result
    return best_result


def _lloyd(rows: RowBlocks, k: int, seed: int, max_iter: int, init: str | torch.Tensor, assign) -> KMeansResult:
    """One k-means run from ``seed``: seeding, then Lloyd iterations until no assignment changes."""
    rng = np.random.default_rng(seed)
    if isinstance(init, torch.Tensor):
        centroids = F.normalize(init.to(rows.device, torch.float32), dim=1)
    elif init == "k-means++":
        centroids = kmeans_plusplus(rows, k, rng)
    elif init == "random":  # the official code's uniform init
        centroids = torch.stack([rows.row(int(i)) for i in rng.choice(rows.n, size=k, replace=False)])
    else:
        raise ValueError(f"unknown init {init!r} (k-means++ or random)")

    labels = torch.empty(rows.n, dtype=torch.int64)
    best = torch.empty(rows.n, dtype=torch.float32)

    def e_step(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Assign every row; also return per-cluster sums of the rows (the next M-step)."""
        sums = torch.zeros_like(c)
        for start, block in rows.blocks():
            block_labels, block_best = assign(block, c)
            labels[start : start + len(block)] = block_labels.cpu()
            best[start : start + len(block)] = block_best.cpu()
            sums.index_add_(0, block_labels, block)
        return sums, torch.bincount(labels, minlength=k)

    sums, counts = e_step(centroids)
    reseeded, converged, it = 0, False, 0
    for it in range(1, max_iter + 1):  # noqa: B007 (it: the iterations run, logged after the loop)
        previous = labels.clone()
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            # Re-seed each empty cluster with the point that fits its centroid worst.
            worst = torch.argsort(best)[: len(empty)]
            for cluster, point in zip(empty, worst.tolist()):
                sums[cluster] = rows.row(point)
            reseeded += len(empty)
        centroids = F.normalize(sums, dim=1)
        sums, counts = e_step(centroids)
        changed = int((labels != previous).sum())
        if changed == 0 and not empty:
            converged = True
            break
    log.info(
        "k-means: K=%d, %d iterations, converged=%s, %d empty clusters re-seeded, mean cos %.4f",
        k,
        it,
        converged,
        reseeded,
        float(best.mean()),
    )
    return KMeansResult(labels, centroids.cpu(), best, it, converged, reseeded)
