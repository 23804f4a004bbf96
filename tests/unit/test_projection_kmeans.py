"""Seeded Rademacher projector (determinism, JL) and spherical k-means."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clusterucb.features.projection import RademacherProjector, SJLTProjector, make_projector, rademacher_block, sjlt_block
from clusterucb.selection.kmeans import RowBlocks, kmeans_plusplus, resolve_backend, spherical_kmeans


def test_projector_is_deterministic_across_calls_instances_blocks_and_batches():
    grads = torch.randn(6, 3000, generator=torch.Generator().manual_seed(0))
    a = RademacherProjector(3000, 256, seed=11)
    b = RademacherProjector(3000, 256, seed=11, block_rows=77, cache_bytes=0)  # other blocking, no cache
    first = a.project(grads)
    assert torch.equal(first, a.project(grads))
    assert torch.allclose(first, b.project(grads), atol=1e-5)
    one_by_one = torch.cat([a.project(grads[i : i + 1]) for i in range(len(grads))])
    assert torch.allclose(first, one_by_one, atol=1e-5)
    assert not torch.allclose(first, RademacherProjector(3000, 256, seed=12).project(grads), atol=1e-3)


def test_sign_matrix_is_a_fixed_function_of_seed_row_and_column():
    full = rademacher_block(3, 0, 300, 100)
    assert torch.equal(full[120:180], rademacher_block(3, 120, 180, 100))
    assert set(full.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(full.mean())) < 0.02
    # Columns are (nearly) uncorrelated: no hashing artefact.
    gram = full.T @ full / 300
    off_diagonal = gram - torch.diag(torch.diag(gram))
    assert float(off_diagonal.abs().max()) < 6 / math.sqrt(300)
    # Pinned values guard against a silent change of the basis (stored features would stop being comparable).
    assert rademacher_block(0, 0, 2, 6).int().tolist() == [[1, 1, 1, 1, 1, -1], [1, 1, -1, -1, -1, -1]]


def _signs_by_shifting_bits(seed: int, row_start: int, row_stop: int, proj_dim: int) -> torch.Tensor:
    """The sign matrix's definition, written out bit by bit (how it was generated before the byte lookup)."""
    mask = 0xFFFFFFFF

    def fmix(x):
        x = x ^ (x >> 16)
        x = (x * 0x85EBCA6B) & mask
        x = x ^ (x >> 13)
        x = (x * 0xC2B2AE35) & mask
        return x ^ (x >> 16)

    seed_key = int(fmix(torch.tensor([seed & mask]))[0])
    rows = torch.arange(row_start, row_stop, dtype=torch.int64)
    row_key = fmix((rows * 0x9E3779B1 + seed_key) & mask)
    word_key = (torch.arange((proj_dim + 31) // 32, dtype=torch.int64) * 0x7FEB352D) & mask
    hashes = fmix(((row_key[:, None] ^ word_key[None, :]) + 0x68E31DA4) & mask)
    bits = ((hashes[:, :, None] >> torch.arange(32)) & 1).view(len(rows), -1)[:, :proj_dim]
    return 1 - 2 * bits.float()


@pytest.mark.parametrize("proj_dim", [8192, 100, 33])
def test_sign_matrix_equals_its_bitwise_definition(proj_dim):
    assert torch.equal(rademacher_block(7, 5000, 5130, proj_dim), _signs_by_shifting_bits(7, 5000, 5130, proj_dim))


def test_streamed_projection_of_uncached_blocks_matches_the_cached_one():
    dim, proj_dim = 2500, 200
    grads = torch.randn(5, dim, generator=torch.Generator().manual_seed(2))
    cached = RademacherProjector(dim, proj_dim, seed=9, block_rows=300)
    streamed = RademacherProjector(dim, proj_dim, seed=9, block_rows=300, cache_bytes=0, stream_rows=7)
    full = cached.project(grads)
    assert torch.allclose(full, streamed.project(grads), atol=1e-5)
    assert streamed._cached_bytes == 0 and not streamed._cache
    pieces = sum(streamed.project_block(grads[:, a:b], a) for a, b in ((0, 299), (299, 1001), (1001, dim)))
    assert torch.allclose(full, pieces, atol=1e-5)


def test_projection_preserves_inner_products_within_jl_error():
    dim, proj_dim = 5000, 2048
    x = F.normalize(torch.randn(40, dim, generator=torch.Generator().manual_seed(1)), dim=1)
    # Correlated pairs too, not only near-orthogonal random vectors.
    x = F.normalize(torch.cat([x, x[:20] + 0.5 * x[20:]]), dim=1)
    projected = RademacherProjector(dim, proj_dim, seed=0).project(x)
    error = (projected @ projected.T - x @ x.T).abs()
    # Inner-product error of unit vectors is about sqrt(2 / d); 5 sigma over ~1800 pairs.
    assert float(error.max()) < 5 * math.sqrt(2 / proj_dim)
    assert float((projected.norm(dim=1) - 1).abs().max()) < 0.15


@pytest.mark.parametrize("c", [1, 4])
def test_sjlt_is_deterministic_blockwise_and_preserves_inner_products(c):
    dim, proj_dim = 6000, 2048
    x = F.normalize(torch.randn(40, dim, generator=torch.Generator().manual_seed(6)), dim=1)
    projector = SJLTProjector(dim, proj_dim, seed=4, c=c, block_rows=1000)
    full = projector.project(x)
    pieces = projector.project_block(x[:, :2500], 0) + projector.project_block(x[:, 2500:], 2500)
    assert torch.allclose(full, pieces, atol=1e-5)
    assert torch.allclose(full, SJLTProjector(dim, proj_dim, seed=4, c=c, block_rows=333, cache_bytes=0).project(x), atol=1e-5)
    error = (full @ full.T - x @ x.T).abs()
    assert float(error.max()) < 5 * math.sqrt(2 / proj_dim)
    buckets, signs = sjlt_block(4, 0, dim, proj_dim, c)
    assert buckets.shape == (c, dim) and int(buckets.min()) >= 0 and int(buckets.max()) < proj_dim
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    # Pinned: the basis must not change silently between versions.
    assert sjlt_block(0, 0, 4, 1024, 1)[0].tolist() == [[176, 498, 416, 763]]


def test_projectors_refuse_out_of_range_blocks_and_unknown_kinds():
    projector = make_projector("sjlt", 100, 16, seed=0)
    with pytest.raises(ValueError, match="outside"):
        projector.project_block(torch.zeros(2, 10), 95)
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector("fast_jl", 100, 16, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_projector_is_identical_on_cpu_and_gpu():
    grads = torch.randn(4, 2000)
    cpu = RademacherProjector(2000, 128, seed=5).project(grads)
    gpu = RademacherProjector(2000, 128, seed=5).project(grads.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)
    assert torch.equal(rademacher_block(5, 0, 64, 128), rademacher_block(5, 0, 64, 128, device="cuda").cpu())
    for batch in (1, 3, 4):  # any batch size
        gpu_rows = RademacherProjector(2000, 128, seed=5).project(grads[:batch].cuda()).cpu()
        assert torch.allclose(cpu[:batch], gpu_rows, atol=1e-4)
    cpu_sjlt = SJLTProjector(2000, 128, seed=5).project(grads)
    assert torch.allclose(cpu_sjlt, SJLTProjector(2000, 128, seed=5).project(grads.cuda()).cpu(), atol=1e-4)


def separable_sphere(n_per: int = 60, k: int = 4, dim: int = 32, noise: float = 0.15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    points = torch.cat([centers[c] + noise * torch.randn(n_per, dim, generator=g) / math.sqrt(dim) for c in range(k)])
    truth = torch.arange(k).repeat_interleave(n_per)
    order = torch.randperm(len(points), generator=g)
    return F.normalize(points[order], dim=1), truth[order]


def test_kmeans_recovers_separable_clusters_and_is_deterministic():
    x, truth = separable_sphere()
    result = spherical_kmeans(x, 4, seed=3)
    # Each true cluster maps to exactly one found cluster and vice versa.
    pairs = {(int(t), int(label)) for t, label in zip(truth, result.labels)}
    assert len(pairs) == 4 and len({p[0] for p in pairs}) == 4 and len({p[1] for p in pairs}) == 4
    assert result.converged
    again = spherical_kmeans(x, 4, seed=3)
    assert torch.equal(result.labels, again.labels) and torch.equal(result.centroids, again.centroids)


def test_kmeans_in_memory_cache_changes_nothing_but_is_used(monkeypatch):
    """cache_mb keeps the prepared blocks after the first pass: bit-identical results, and no second read."""
    from clusterucb.selection import kmeans

    x, _ = separable_sphere(k=5, noise=0.8, seed=4)
    parts = [x[:100].half(), x[100:].half()]  # fp16 shards, as the store keeps them
    reads = {"n": 0}
    original = kmeans.RowBlocks.raw_blocks

    def counting(self):
        reads["n"] += 1
        return original(self)

    monkeypatch.setattr(kmeans.RowBlocks, "raw_blocks", counting)
    streamed = spherical_kmeans(parts, 6, seed=1, max_iter=5, center=True, remove_components=1, chunk=64)
    streamed_reads, reads["n"] = reads["n"], 0
    cached = spherical_kmeans(parts, 6, seed=1, max_iter=5, center=True, remove_components=1, chunk=64, cache_mb=1)
    assert torch.equal(streamed.labels, cached.labels) and torch.equal(streamed.centroids, cached.centroids)
    assert torch.equal(streamed.similarity, cached.similarity)
    assert streamed_reads > 5 and reads["n"] == 2  # the mean's pass and the first prepared pass


def test_kmeans_labels_are_consistent_with_returned_centroids():
    x, _ = separable_sphere(k=5, noise=0.8, seed=2)
    result = spherical_kmeans(x, 7, seed=0, max_iter=3)
    assert torch.equal(result.labels, (x @ result.centroids.T).argmax(1))
    assert torch.allclose(result.similarity, (x * result.centroids[result.labels]).sum(1), atol=1e-6)


def test_kmeans_reseeds_empty_clusters():
    # Uniform init on a set with many duplicates: several initial centroids coincide,
    # so some clusters start empty and must be re-seeded (not left as zero centroids).
    base, _ = separable_sphere(n_per=1, k=6, seed=4)
    x = torch.cat([base[:1].repeat(40, 1), base[1:]])
    result = spherical_kmeans(x, 5, seed=1, init="random")
    assert result.reseeded > 0
    assert torch.allclose(result.centroids.norm(dim=1), torch.ones(5), atol=1e-5)
    assert len(result.labels.unique()) == 5


def test_kmeans_rejects_failed_rows_and_bad_k():
    x, _ = separable_sphere()
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        spherical_kmeans(bad, 3, seed=0)
    with pytest.raises(ValueError, match="k="):
        spherical_kmeans(x[:5], 6, seed=0)


def test_pykeops_backend_agrees_with_torch():
    pytest.importorskip("pykeops")
    x, _ = separable_sphere(n_per=40, k=3, dim=16, seed=5)
    torch_result = spherical_kmeans(x, 3, seed=2, backend="torch")
    keops_result = spherical_kmeans(x, 3, seed=2, backend="pykeops")
    assert torch.equal(torch_result.labels, keops_result.labels)
    assert torch.allclose(torch_result.centroids, keops_result.centroids, atol=1e-5)


def test_faiss_backend_agrees_with_torch():
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install -e '.[bench]')")
    x, _ = separable_sphere(n_per=40, k=3, dim=16, seed=5)
    torch_result = spherical_kmeans(x, 3, seed=2, backend="torch")
    faiss_result = spherical_kmeans(x, 3, seed=2, backend="faiss")
    assert torch.equal(torch_result.labels, faiss_result.labels)
    assert torch.allclose(torch_result.centroids, faiss_result.centroids, atol=1e-5)
    assert torch.allclose(torch_result.similarity, faiss_result.similarity, atol=1e-5)
    assert resolve_backend("auto", torch.device("cpu")) == "faiss"


def test_faiss_backend_names_the_install_when_faiss_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail as if not installed
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        resolve_backend("faiss", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown k-means backend"):
        resolve_backend("sklearn", torch.device("cpu"))


def test_given_initial_centroids_replace_the_seeding():
    x, _ = separable_sphere(k=5, noise=0.8, seed=2)
    seeded = kmeans_plusplus(RowBlocks(x, torch.device("cpu")), 5, np.random.default_rng(1))
    given = spherical_kmeans(x, 5, seed=0, init=seeded)
    assert torch.equal(given.labels, spherical_kmeans(x, 5, seed=1).labels)  # seed 1's k-means++ is ``seeded``
    with pytest.raises(ValueError, match="initial centroids"):
        spherical_kmeans(x, 5, seed=0, init=seeded[:4])
    with pytest.raises(ValueError, match="initial centroids"):
        spherical_kmeans(x, 5, seed=0, init=seeded, restarts=2)


def shared_direction_sphere(k=4, n_per=60, dim=64, share=8.0, seed=0):
    """Separable clusters riding on one direction every row shares (as Adam features do): cosine is dominated by it."""
    x, truth = separable_sphere(k=k, n_per=n_per, dim=dim, noise=0.3, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    common = F.normalize(torch.randn(dim, generator=g), dim=0)
    scale = share * torch.rand(len(x), 1, generator=g) ** 2  # a per-row amount of the shared part, widely spread
    return F.normalize(x + scale * common, dim=1), truth, common


def _purity(labels, truth):
    pairs = torch.stack([truth, labels], 1).unique(dim=0)
    return len({int(t) for t, _ in pairs}) == len(pairs)  # each found cluster holds one true cluster


def test_removing_the_shared_direction_recovers_the_clusters():
    x, truth, common = shared_direction_sphere()
    plain = spherical_kmeans(x, 4, seed=0)
    removed = spherical_kmeans(x, 4, seed=0, center=True, remove_components=1)
    # The varying amount of the shared direction decides the default's clusters; with the top
    # principal direction projected out, the planted clusters come back exactly.
    assert not _purity(plain.labels, truth)
    assert _purity(removed.labels, truth) and sorted(torch.bincount(removed.labels).tolist()) == [60] * 4
    from clusterucb.selection.kmeans import RowBlocks, fit_preprocess

    prep = fit_preprocess(RowBlocks(x, torch.device("cpu")), center=True, remove_components=1, seed=0)
    assert abs(float(prep.basis[:, 0] @ common)) > 0.85
    assert torch.allclose(prep.mean, x.mean(0), atol=1e-6)
    assert fit_preprocess(RowBlocks(x, torch.device("cpu")), center=False, remove_components=0, seed=0) is None
    # Deterministic, also with the randomized SVD.
    assert torch.equal(removed.labels, spherical_kmeans(x, 4, seed=0, center=True, remove_components=1).labels)
    with pytest.raises(ValueError, match="remove_components"):
        spherical_kmeans(x, 4, seed=0, remove_components=64)


def test_restarts_keep_the_best_run_and_are_seeded():
    x, _ = separable_sphere(k=6, n_per=30, noise=1.2, seed=3)
    single = spherical_kmeans(x, 6, seed=0, init="random", max_iter=5)
    best = spherical_kmeans(x, 6, seed=0, init="random", max_iter=5, restarts=4)
    runs = [spherical_kmeans(x, 6, seed=int(s), init="random", max_iter=5) for s in np.random.SeedSequence(0).generate_state(4)]
    assert float(best.similarity.mean()) == pytest.approx(max(float(r.similarity.mean()) for r in runs))
    assert torch.equal(best.labels, spherical_kmeans(x, 6, seed=0, init="random", max_iter=5, restarts=4).labels)
    assert single.labels.shape == best.labels.shape
    with pytest.raises(ValueError, match="restarts"):
        spherical_kmeans(x, 6, seed=0, restarts=0)


def test_gpu_kmeans_defaults_to_the_gemm_and_keops_builds_in_a_folder_of_its_own(tmp_path, monkeypatch):
    from clusterucb.selection import kmeans

    assert resolve_backend("auto", torch.device("cuda")) == "torch"  # KeOps compiles at run time: only when named
    assert resolve_backend("pykeops", torch.device("cuda")) == "pykeops"
    pytest.importorskip("pykeops")
    monkeypatch.setenv(kmeans.KEOPS_CACHE_ENV, str(tmp_path))
    monkeypatch.delenv("KEOPS_CACHE_FOLDER", raising=False)
    folders = []
    for _ in range(2):  # two jobs (or two calls): two folders, each gone afterwards
        with kmeans.keops_build_folder() as folder:
            import pykeops

            assert os.environ["KEOPS_CACHE_FOLDER"] == folder and pykeops.get_build_folder().startswith(folder)
            assert Path(folder).parent == tmp_path and Path(folder).is_dir()
            folders.append(folder)
        assert not Path(folder).exists()
    assert folders[0] != folders[1] and "KEOPS_CACHE_FOLDER" not in os.environ


def test_dense_projector_blocks_are_sized_by_device(monkeypatch):
    """On a GPU an uncached dense projection expands thousands of rows per GEMM (not 64): same matrix, same features."""
    from clusterucb.features import projection

    grads = torch.randn(3, 40_000, generator=torch.Generator().manual_seed(1))
    cpu_sized = RademacherProjector(40_000, 8192, seed=4, cache_bytes=0)
    gpu_sized = RademacherProjector(40_000, 8192, seed=4, cache_bytes=0, device="cuda")  # sizes only: computes where grads are
    assert (cpu_sized.block_rows, cpu_sized.stream_rows) == (1024, 64)
    assert gpu_sized.block_rows == gpu_sized.stream_rows == 8192
    calls = {"n": 0}
    original = projection.expand_signs

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(projection, "expand_signs", counting)
    expected = cpu_sized.project(grads)
    cpu_calls, calls["n"] = calls["n"], 0
    got = gpu_sized.project(grads)
    assert (cpu_calls, calls["n"]) == (625, 5)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.allclose(make_projector("rademacher", 40_000, 8192, 4, device="cuda").project(grads), expected, rtol=1e-4, atol=1e-4)
