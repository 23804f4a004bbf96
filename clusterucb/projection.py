"""Random projections of per-sample gradients (TRAK-style ``Projector.project(grads)``).

Neither projector draws from a device RNG: every random entry is an integer
hash of (seed, row, column) computed with int64 tensor arithmetic, so the same
seed gives the same projection on CPU and GPU, for any batch size and any
blocking, and features stay comparable across machines (unlike fast_jl, whose
matrix depends on the GPU's SM count).

Projections are linear, so a gradient can be projected piece by piece:
``project_block(grads[:, a:b], a)`` is the contribution of coordinates a..b,
and the sum over pieces equals ``project(grads)``. The featurizer uses this to
project one LoRA module at a time without materialising the flat gradient.

- ``rademacher``: dense ±1/sqrt(d) (the LESS / TRAK projection), p·d work per sample.
- ``sjlt``: sparse JL / CountSketch, c nonzeros ±1/sqrt(c) per input coordinate,
  O(c·p) per sample (Kane & Nelson; GraSS uses it for gradients).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager

import torch

_MASK32 = 0xFFFFFFFF
PROJECTORS = ("rademacher", "sjlt")


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _seed_key(seed: int, stream: int = 0) -> int:
    key = torch.tensor([(seed & _MASK32) ^ (stream * 0x632BE5AB & _MASK32)], dtype=torch.int64)
    return int(_fmix32(key)[0]) ^ ((seed >> 32) & _MASK32)


def _row_keys(seed_key: int, row_start: int, row_stop: int, device) -> torch.Tensor:
    rows = torch.arange(row_start, row_stop, device=device, dtype=torch.int64)
    return _fmix32((rows * 0x9E3779B1 + seed_key) & _MASK32)


def rademacher_block(seed: int, row_start: int, row_stop: int, proj_dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rows ``row_start:row_stop`` of the seeded ±1 matrix, shape (rows, proj_dim).

    One 32-bit hash of (seed, row, column // 32) gives the signs of 32 columns.
    """
    device = torch.device(device or "cpu")
    row_key = _row_keys(_seed_key(seed), row_start, row_stop, device)
    words = torch.arange((proj_dim + 31) // 32, device=device, dtype=torch.int64)
    word_key = (words * 0x7FEB352D) & _MASK32
    hashes = _fmix32(((row_key[:, None] ^ word_key[None, :]) + 0x68E31DA4) & _MASK32)
    shifts = torch.arange(32, device=device, dtype=torch.int64)
    bits = ((hashes[:, :, None] >> shifts) & 1).view(len(row_key), -1)[:, :proj_dim]
    return bits.to(dtype).mul_(-2).add_(1)


def sjlt_block(seed: int, row_start: int, row_stop: int, proj_dim: int, c: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets (c, rows) in [0, proj_dim) and signs (c, rows) in {-1, +1} of input coordinates row_start..row_stop."""
    device = torch.device(device or "cpu")
    buckets, signs = [], []
    for r in range(c):
        key = _row_keys(_seed_key(seed, stream=r + 1), row_start, row_stop, device)
        mixed = _fmix32((key * 0x2C1B3C6D + 0x297A2D39) & _MASK32)
        buckets.append(mixed % proj_dim)
        signs.append(1 - 2 * ((key >> 31) & 1))
    return torch.stack(buckets), torch.stack(signs).to(torch.float32)


@contextmanager
def _deterministic_scatter(device: torch.device, enabled: bool):
    """CUDA's index_add_ sums colliding buckets with atomics, in a run-dependent order;
    PyTorch's deterministic mode switches it to a sorted, fixed-order sum, so the same
    config gives the same features and the same selection (benchmarks/gradients.py
    prints what it costs on a GPU)."""
    if not enabled or device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False, warn_only=warn_only)


class Projector(ABC):
    """Maps (n, grad_dim) gradients to (n, proj_dim) features; linear, so blocks can be projected separately."""

    name: str
    grad_dim: int
    proj_dim: int
    seed: int

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, block_rows: int, scale: float, cache_bytes: int = 2 << 30):
        if grad_dim <= 0 or proj_dim <= 0:
            raise ValueError(f"grad_dim and proj_dim must be positive, got {grad_dim}, {proj_dim}")
        self.grad_dim, self.proj_dim, self.seed = int(grad_dim), int(proj_dim), int(seed)
        self.block_rows, self._scale = int(block_rows), float(scale)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[tuple, object] = {}
        self._cached_bytes = 0

    def _cached(self, key: tuple, nbytes: int, make):
        """Generated randomness for ``key``, kept while the cache stays under ``cache_bytes``."""
        value = self._cache.get(key)
        if value is None:
            value = make()
            if self._cached_bytes + nbytes <= self.cache_bytes:
                self._cache[key] = value
                self._cached_bytes += nbytes
        return value

    @abstractmethod
    def _make_block(self, block_start: int, block_stop: int, device) -> object:
        """The randomness of input coordinates ``block_start:block_stop``."""

    @abstractmethod
    def _block_bytes(self, rows: int) -> int:
        """Memory of one generated block of ``rows`` input coordinates (for the cache budget)."""

    @abstractmethod
    def _accumulate(self, out: torch.Tensor, piece: torch.Tensor, block, lo: int, hi: int) -> None:
        """Add the projection of ``piece`` (n, hi - lo), block rows ``lo:hi``, to ``out`` (unscaled)."""

    @torch.no_grad()
    def project_block(self, grads: torch.Tensor, start: int) -> torch.Tensor:
        """(n, proj_dim) contribution of gradient coordinates ``start : start + grads.shape[1]``."""
        if grads.ndim != 2 or start < 0 or start + grads.shape[1] > self.grad_dim:
            raise ValueError(f"block {start}:{start + grads.shape[1]} is outside the {self.grad_dim} gradient dims")
        grads = grads.float()
        out = torch.zeros(grads.shape[0], self.proj_dim, device=grads.device, dtype=torch.float32)
        stop = start + grads.shape[1]
        # Blocks aligned to multiples of block_rows, so pieces of any size share the cache.
        for block_start in range((start // self.block_rows) * self.block_rows, stop, self.block_rows):
            block_stop = min(block_start + self.block_rows, self.grad_dim)
            block = self._cached(
                (block_start, str(grads.device)),
                self._block_bytes(block_stop - block_start),
                lambda: self._make_block(block_start, block_stop, grads.device),
            )
            lo, hi = max(start, block_start), min(stop, block_stop)
            self._accumulate(out, grads[:, lo - start : hi - start], block, lo - block_start, hi - block_start)
        return out.mul_(self._scale)

    @torch.no_grad()
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.ndim != 2 or grads.shape[1] != self.grad_dim:
            raise ValueError(f"expected (n, {self.grad_dim}) gradients, got {tuple(grads.shape)}")
        return self.project_block(grads, 0)

    def describe(self) -> dict:
        return {"projector": self.name, "grad_dim": self.grad_dim, "proj_dim": self.proj_dim, "proj_seed": self.seed}


class RademacherProjector(Projector):
    """Dense ±1/sqrt(d) projection, generated block-wise from a seed.

    Blocks of ``block_rows`` rows are generated on the gradients' device and
    kept while their total stays under ``cache_bytes`` (the whole matrix for
    LoRA-sized gradients of small models); past that they are regenerated per
    call, so a p x d matrix never has to fit in memory.
    """

    name = "rademacher"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, block_rows: int = 1024, cache_bytes: int = 2 << 30):
        super().__init__(grad_dim, proj_dim, seed, block_rows, 1.0 / math.sqrt(proj_dim), cache_bytes)

    def _make_block(self, block_start: int, block_stop: int, device) -> torch.Tensor:
        return rademacher_block(self.seed, block_start, block_stop, self.proj_dim, device=device)

    def _block_bytes(self, rows: int) -> int:
        return rows * self.proj_dim * 4

    def _accumulate(self, out: torch.Tensor, piece: torch.Tensor, block: torch.Tensor, lo: int, hi: int) -> None:
        out.addmm_(piece, block[lo:hi])


class SJLTProjector(Projector):
    """Sparse JL / CountSketch: coordinate i adds ±g_i/sqrt(c) to c hashed output buckets.

    O(c·p) per sample instead of O(p·d); ``c`` = 1 is CountSketch. Buckets and
    signs are cached per block like the Rademacher blocks. On a GPU the bucket sums
    run in a fixed order unless ``deterministic`` is False (atomics: faster, but the
    last bits of a feature change from run to run).
    """

    name = "sjlt"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, c: int = 1, block_rows: int = 1 << 20, cache_bytes: int = 2 << 30, deterministic: bool = True):
        if c < 1:
            raise ValueError(f"sjlt needs c >= 1 nonzeros per column, got {c}")
        super().__init__(grad_dim, proj_dim, seed, block_rows, 1.0 / math.sqrt(c), cache_bytes)
        self.c = int(c)
        self.deterministic = bool(deterministic)

    def describe(self) -> dict:
        return {**super().describe(), "sjlt_c": self.c}

    def _make_block(self, block_start: int, block_stop: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return sjlt_block(self.seed, block_start, block_stop, self.proj_dim, self.c, device=device)

    def _block_bytes(self, rows: int) -> int:
        return rows * self.c * 12  # int64 bucket + float32 sign per nonzero

    def _accumulate(self, out: torch.Tensor, piece: torch.Tensor, block: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int) -> None:
        buckets, signs = block
        with _deterministic_scatter(out.device, self.deterministic):
            for r in range(self.c):
                out.index_add_(1, buckets[r, lo:hi], piece * signs[r, lo:hi])


def make_projector(kind: str, grad_dim: int, proj_dim: int, seed: int, sjlt_c: int = 1) -> Projector:
    if kind == "rademacher":
        return RademacherProjector(grad_dim, proj_dim, seed)
    if kind == "sjlt":
        return SJLTProjector(grad_dim, proj_dim, seed, c=sjlt_c)
    raise ValueError(f"unknown projector {kind!r} (known: {', '.join(PROJECTORS)})")
