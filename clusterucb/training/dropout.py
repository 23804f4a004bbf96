"""Dropout whose masks belong to the example, not to the micro-batch it happens to be in.

``torch.nn.Dropout`` draws its mask for the whole (micro-batch, tokens, features) tensor from the
device's generator, so the masks an example gets depend on which examples share its micro-batch,
on the padding, and on the device (CPU and CUDA generators differ). Here the mask of an example is
a pure function of a 32-bit *row key* (given per example by the training loop: the run's seed, the
optimizer step and the example's position in that step), the module's name, and the element's
coordinates (token position, feature): an integer hash (MurmurHash3's finaliser, as the random
projections use) computed with int64 tensor arithmetic. Hence

- ``train.micro_batch`` changes no dropout mask: a step's gradient is the same sum whatever the
  micro-batch size (equal to float rounding), so it is a memory knob (and the OOM back-off may halve it);
- right padding changes no mask (a coordinate's hash does not depend on the padded length);
- the masks are identical on CPU and on any GPU, and a gradient-checkpointing recompute sees the same mask;
- no generator state is consumed, so resuming a job needs none for dropout.

Cost: one hash per element, computed one example at a time (two int64 buffers of tokens x features).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from contextlib import contextmanager

import torch

_MASK32 = 0xFFFFFFFF
_DIM_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1)
_row_keys: list[int] | None = None


def mix32(*values: int) -> int:
    """A 32-bit hash of integers (MurmurHash3's finaliser, chained), in plain Python."""
    h = 0x811C9DC5
    for value in values:
        h = (h ^ (int(value) & _MASK32)) * 0x01000193 & _MASK32
        h ^= h >> 16
        h = h * 0x85EBCA6B & _MASK32
        h ^= h >> 13
        h = h * 0xC2B2AE35 & _MASK32
        h ^= h >> 16
    return h


def _fmix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser in place on int64 tensors holding uint32 values (``tmp``: scratch of the same shape)."""
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp)
        if multiplier is not None:
            x.mul_(multiplier).bitwise_and_(_MASK32)
    return x


def row_keys(seed: int, step: int, count: int) -> list[int]:
    """The keys of the ``count`` examples of optimizer step ``step`` (by position in the step)."""
    return [mix32(seed, step, position) for position in range(count)]


@contextmanager
def example_keys(keys: Sequence[int]):
    """The row keys of the batch that is about to run forward (and backward: checkpointed layers recompute)."""
    global _row_keys
    previous, _row_keys = _row_keys, [int(k) for k in keys]
    try:
        yield
    finally:
        _row_keys = previous


def keep_mask(keys: Sequence[int], module_key: int, shape: Sequence[int], p: float, device) -> torch.Tensor:
    """(len(keys), *shape[1:]) bool: True where an element is kept, each with probability 1 - p.

    Element (b, i1, ..., ik) is kept when hash(keys[b], module_key, i1, ..., ik) >= p * 2**32; the
    coordinates are hashed one dimension at a time, so a prefix of a longer dimension has the same mask.
    """
    if len(keys) != shape[0]:
        raise ValueError(f"{len(keys)} dropout keys for a batch of {shape[0]} rows")
    threshold = min(int(p * 2**32), 2**32)
    out = torch.empty(tuple(shape), dtype=torch.bool, device=device)
    coordinates = [
        (torch.arange(n, device=device, dtype=torch.int64) * _DIM_MULTIPLIERS[d % len(_DIM_MULTIPLIERS)]) & _MASK32
        for d, n in enumerate(shape[1:])
    ]
    for row, key in enumerate(keys):
        h = torch.tensor(mix32(key, module_key), dtype=torch.int64, device=device)
        for coordinate in coordinates:
            h = h[..., None] ^ coordinate
            _fmix32_(h, torch.empty_like(h))
        out[row] = h >= threshold
    return out


class ExampleSeededDropout(torch.nn.Module):
    """Drop-in for ``nn.Dropout`` (same ``p``, same scaling by 1 / (1 - p)) with per-example hashed masks.

    In training mode it needs the batch's row keys (:func:`example_keys`); it refuses to run without
    them rather than fall back to a generator-drawn mask.
    """

    def __init__(self, p: float, name: str):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.name = name
        self.module_key = zlib.crc32(name.encode())

    def extra_repr(self) -> str:
        return f"p={self.p}, keyed per example"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if _row_keys is None:
            raise RuntimeError(
                f"{self.name}: per-example dropout in training mode needs the batch's row keys "
                "(clusterucb.training.dropout.example_keys; clusterucb.training.trainer.train_lora sets them)"
            )
        keep = keep_mask(_row_keys, self.module_key, x.shape, self.p, x.device)
        return torch.where(keep, x, 0.0) * (1.0 / (1.0 - self.p))


def install_example_dropout(model: torch.nn.Module) -> int:
    """Replace every active ``nn.Dropout`` of ``model`` (LoRA's and the base model's) by an
    :class:`ExampleSeededDropout` of the same ``p``, keyed by the module's name; idempotent.

    Returns how many modules are keyed per example (newly or already). Attention-probability dropout
    inside the attention kernel (a model config's ``attention_dropout`` > 0) is not a module and still
    draws from the device's generator: :func:`kernel_dropout` names it so callers can warn.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, ExampleSeededDropout):
                replaced += 1
            elif type(child) is torch.nn.Dropout and child.p > 0:
                setattr(module, child_name, ExampleSeededDropout(child.p, full))
                replaced += 1
    return replaced


def kernel_dropout(model: torch.nn.Module) -> dict[str, float]:
    """Dropout probabilities > 0 in the model's config that act inside kernels (not keyed per example)."""
    config = getattr(model, "config", None)
    found = {}
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        value = getattr(config, key, 0) if config is not None else 0
        if isinstance(value, (int, float)) and value > 0:
            found[key] = float(value)
    return found
