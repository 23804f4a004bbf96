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
import sys
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import NamedTuple

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


def _fmix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``_fmix32`` in place, with ``tmp`` (same shape) as scratch: no allocation per call, which
    matters when the dense matrix is regenerated block by block for a large LoRA."""
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp)
        if multiplier is not None:
            x.mul_(multiplier).bitwise_and_(_MASK32)
    return x


def rademacher_words(seed: int, row_start: int, row_stop: int, proj_dim: int, device=None, out=None, tmp=None) -> torch.Tensor:
    """(rows, ceil(proj_dim / 32)) int64 hashes of (seed, row, column // 32); bit j of word w is
    the sign bit of column 32 w + j. ``out`` and ``tmp`` (int64, at least that many rows) are reused if given."""
    device = torch.device(device or "cpu")
    rows, words = row_stop - row_start, (proj_dim + 31) // 32
    row_key = _row_keys(_seed_key(seed), row_start, row_stop, device)
    word_key = (torch.arange(words, device=device, dtype=torch.int64) * 0x7FEB352D) & _MASK32
    out = torch.empty(rows, words, device=device, dtype=torch.int64) if out is None else out[:rows]
    tmp = torch.empty_like(out) if tmp is None else tmp[:rows]
    torch.bitwise_xor(row_key[:, None], word_key[None, :], out=out)
    out.add_(0x68E31DA4).bitwise_and_(_MASK32)
    return _fmix32_(out, tmp)


_SIGN_TABLES: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _sign_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row v holds 1 - 2 * bit k of v, so one byte of a hash word expands to 8 signs by one lookup."""
    key = (str(device), dtype)
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256, dtype=torch.int64)[:, None] >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (1 - 2 * bits).to(device=device, dtype=dtype)
    return _SIGN_TABLES[key]


def expand_signs(words: torch.Tensor, out: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
    """(rows, 32 * words) ±1 from ``rademacher_words``' hashes, written into ``out`` (contiguous) if given.

    A byte lookup instead of shifting out 32 bits per word: 8 to 10 times faster on a CPU,
    where regenerating the matrix of a 15M-dim LoRA otherwise dominates the projection.
    """
    rows, n_words = words.shape
    if sys.byteorder == "little":  # the low 4 bytes of each int64 word, lowest first
        index = words.view(torch.uint8).view(rows, n_words, 8)[:, :, :4].to(torch.int32)
    else:
        index = (words[:, :, None] >> torch.tensor([0, 8, 16, 24], device=words.device)) & 255
    table = _sign_table(words.device, dtype if out is None else out.dtype)
    if out is None:
        out = torch.empty(rows, 32 * n_words, device=words.device, dtype=table.dtype)
    torch.index_select(table, 0, index.reshape(-1), out=out.view(-1, 8))
    return out


def rademacher_block(seed: int, row_start: int, row_stop: int, proj_dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rows ``row_start:row_stop`` of the seeded ±1 matrix, shape (rows, proj_dim).

    One 32-bit hash of (seed, row, column // 32) gives the signs of 32 columns.
    """
    signs = expand_signs(rademacher_words(seed, row_start, row_stop, proj_dim, device), dtype=dtype)
    return signs if signs.shape[1] == proj_dim else signs[:, :proj_dim].contiguous()


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

    def _block(self, block_start: int, block_stop: int, device: torch.device):
        """The randomness of rows ``block_start:block_stop``: cached while the cache stays under
        ``cache_bytes``, else a transient block that is only valid until the next call."""
        key = (block_start, str(device))
        block = self._cache.get(key)
        if block is None:
            nbytes = self._block_bytes(block_stop - block_start)
            if self._cached_bytes + nbytes > self.cache_bytes:
                return self._transient_block(block_start, block_stop, device)
            block = self._cache[key] = self._make_block(block_start, block_stop, device)
            self._cached_bytes += nbytes
        return block

    def _transient_block(self, block_start: int, block_stop: int, device: torch.device) -> object:
        """A block that will not be cached; subclasses may return a cheaper form ``_accumulate`` understands."""
        return self._make_block(block_start, block_stop, device)

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
            block = self._block(block_start, block_stop, grads.device)
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


class _SignWords(NamedTuple):
    """A transient Rademacher block: its hash words and the buffer they are expanded into."""

    words: torch.Tensor
    signs: torch.Tensor


class RademacherProjector(Projector):
    """Dense ±1/sqrt(d) projection, generated block-wise from a seed.

    Blocks of ``block_rows`` rows are generated on the gradients' device and
    kept while their total stays under ``cache_bytes`` (the whole matrix for
    LoRA-sized gradients of small models); past that they are regenerated per
    call, so a p x d matrix never has to fit in memory: as hash words, expanded
    ``stream_rows`` rows at a time into one reused buffer that stays in cache
    (a fresh 32 MB block per 1024 rows made page faults dominate on a CPU).

    Block sizes follow the device (``device``, where the gradients will be): on a CPU 1024-row blocks
    streamed 64 rows at a time, sized for its caches; on a GPU blocks of ``GPU_STREAM_BYTES`` of signs
    expanded at once (8192 rows at d = 8192), so an uncached projection of a 134M-parameter LoRA is
    16k GEMMs per batch, not 2M 64-row ones. The matrix is the same whatever the blocks; the sums
    change in rounding only.
    """

    name = "rademacher"
    GPU_STREAM_BYTES = 256 << 20

    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        seed: int,
        block_rows: int | None = None,
        cache_bytes: int = 2 << 30,
        stream_rows: int | None = None,
        device=None,
    ):
        on_gpu = device is not None and torch.device(device).type == "cuda"
        gpu_rows = max(1024, self.GPU_STREAM_BYTES // (4 * int(proj_dim)))
        block_rows = block_rows or (gpu_rows if on_gpu else 1024)
        super().__init__(grad_dim, proj_dim, seed, block_rows, 1.0 / math.sqrt(proj_dim), cache_bytes)
        self.stream_rows = min(int(stream_rows or (self.block_rows if on_gpu else 64)), self.block_rows)
        self._scratch: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _make_block(self, block_start: int, block_stop: int, device) -> torch.Tensor:
        return rademacher_block(self.seed, block_start, block_stop, self.proj_dim, device=device)

    def _transient_block(self, block_start: int, block_stop: int, device) -> _SignWords:
        key = str(device)
        if key not in self._scratch:
            words = (self.proj_dim + 31) // 32
            hashes = torch.empty(self.block_rows, words, device=device, dtype=torch.int64)
            signs = torch.empty(self.stream_rows, 32 * words, device=device, dtype=torch.float32)
            self._scratch[key] = (hashes, torch.empty_like(hashes), signs)
        hashes, tmp, signs = self._scratch[key]
        return _SignWords(rademacher_words(self.seed, block_start, block_stop, self.proj_dim, device, out=hashes, tmp=tmp), signs)

    def _block_bytes(self, rows: int) -> int:
        return rows * self.proj_dim * 4

    def _accumulate(self, out: torch.Tensor, piece: torch.Tensor, block, lo: int, hi: int) -> None:
        if isinstance(block, torch.Tensor):
            out.addmm_(piece, block[lo:hi])
            return
        for a in range(lo, hi, self.stream_rows):
            b = min(a + self.stream_rows, hi)
            signs = expand_signs(block.words[a:b], out=block.signs[: b - a])
            out.addmm_(piece[:, a - lo : b - lo], signs[:, : self.proj_dim])


class SJLTProjector(Projector):
    """Sparse JL / CountSketch: coordinate i adds ±g_i/sqrt(c) to c hashed output buckets.

    O(c·p) per sample instead of O(p·d); ``c`` = 1 is CountSketch. Buckets and
    signs are cached per block like the Rademacher blocks. On a GPU the bucket sums
    run in a fixed order unless ``deterministic`` is False (atomics: faster, but the
    last bits of a feature change from run to run).
    """

    name = "sjlt"

    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        seed: int,
        c: int = 1,
        block_rows: int = 1 << 20,
        cache_bytes: int = 2 << 30,
        deterministic: bool = True,
    ):
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


def make_projector(kind: str, grad_dim: int, proj_dim: int, seed: int, sjlt_c: int = 1, device=None) -> Projector:
    """A projector whose block sizes suit ``device`` (where the gradients are); the projection does not depend on it."""
    if kind == "rademacher":
        return RademacherProjector(grad_dim, proj_dim, seed, device=device)
    if kind == "sjlt":
        return SJLTProjector(grad_dim, proj_dim, seed, c=sjlt_c)
    raise ValueError(f"unknown projector {kind!r} (known: {', '.join(PROJECTORS)})")
