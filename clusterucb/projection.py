"""Random projections of per-sample gradients (TRAK-style ``Projector.project(grads)``).

The Rademacher projector never draws from a device RNG: entry (i, j) of the
p x d sign matrix is a bit of an integer hash of (seed, i, j), computed with
int64 tensor arithmetic. The same seed therefore gives the same matrix on CPU
and GPU, for any batch size and any block size, and features are comparable
across machines (unlike fast_jl, whose matrix depends on the GPU's SM count).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def rademacher_block(seed: int, row_start: int, row_stop: int, proj_dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rows ``row_start:row_stop`` of the seeded ±1 matrix, shape (rows, proj_dim).

    One 32-bit hash of (seed, row, column // 32) gives the signs of 32 columns.
    """
    device = torch.device(device or "cpu")
    seed_key = int(_fmix32(torch.tensor([seed & _MASK32], dtype=torch.int64))[0]) ^ ((seed >> 32) & _MASK32)
    rows = torch.arange(row_start, row_stop, device=device, dtype=torch.int64)
    words = torch.arange((proj_dim + 31) // 32, device=device, dtype=torch.int64)
    row_key = _fmix32((rows * 0x9E3779B1 + seed_key) & _MASK32)
    word_key = (words * 0x7FEB352D) & _MASK32
    hashes = _fmix32(((row_key[:, None] ^ word_key[None, :]) + 0x68E31DA4) & _MASK32)
    shifts = torch.arange(32, device=device, dtype=torch.int64)
    bits = ((hashes[:, :, None] >> shifts) & 1).view(len(rows), -1)[:, :proj_dim]
    return bits.to(dtype).mul_(-2).add_(1)


class Projector(ABC):
    """Maps (n, grad_dim) gradients to (n, proj_dim) features."""

    grad_dim: int
    proj_dim: int
    seed: int

    @abstractmethod
    def project(self, grads: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict:
        return {"projector": self.name, "grad_dim": self.grad_dim, "proj_dim": self.proj_dim, "proj_seed": self.seed}


class RademacherProjector(Projector):
    """Dense ±1/sqrt(d) projection, generated block-wise from a seed.

    Blocks of ``block_rows`` rows are generated on the gradients' device; they
    are kept for reuse while their total size stays under ``cache_bytes`` (the
    whole matrix for LoRA-sized gradients of small models), and regenerated per
    call otherwise, so a P x d matrix is never required to fit in memory.
    """

    name = "rademacher"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, block_rows: int = 1024, cache_bytes: int = 2 << 30):
        if grad_dim <= 0 or proj_dim <= 0:
            raise ValueError(f"grad_dim and proj_dim must be positive, got {grad_dim}, {proj_dim}")
        self.grad_dim, self.proj_dim, self.seed = int(grad_dim), int(proj_dim), int(seed)
        self.block_rows = int(block_rows)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[tuple[int, str], torch.Tensor] = {}
        self._scale = 1.0 / math.sqrt(self.proj_dim)

    def _block(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        key = (start, str(device))
        block = self._cache.get(key)
        if block is None:
            block = rademacher_block(self.seed, start, stop, self.proj_dim, device=device)
            if (len(self._cache) + 1) * self.block_rows * self.proj_dim * 4 <= self.cache_bytes:
                self._cache[key] = block
        return block

    @torch.no_grad()
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.ndim != 2 or grads.shape[1] != self.grad_dim:
            raise ValueError(f"expected (n, {self.grad_dim}) gradients, got {tuple(grads.shape)}")
        grads = grads.float()
        out = torch.zeros(grads.shape[0], self.proj_dim, device=grads.device, dtype=torch.float32)
        for start in range(0, self.grad_dim, self.block_rows):
            stop = min(start + self.block_rows, self.grad_dim)
            out.addmm_(grads[:, start:stop], self._block(start, stop, grads.device))
        return out.mul_(self._scale)


def make_projector(kind: str, grad_dim: int, proj_dim: int, seed: int) -> Projector:
    if kind == "rademacher":
        return RademacherProjector(grad_dim, proj_dim, seed)
    raise ValueError(f"unknown projector {kind!r} (known: rademacher)")
