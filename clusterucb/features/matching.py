"""LESS-style influence: max over subtasks of the mean cosine to that subtask's validation gradients (spec §4)."""

from __future__ import annotations

import torch


def subtask_scores(train: torch.Tensor, val: torch.Tensor, val_subtask: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N, S): each train row's mean inner product with each subtask's validation rows (subtasks in sorted id order)."""
    if val.ndim != 2 or train.ndim != 2 or train.shape[1] != val.shape[1]:
        raise ValueError(f"feature shapes do not match: train {tuple(train.shape)}, val {tuple(val.shape)}")
    if not torch.isfinite(val).all():
        raise ValueError("validation features contain NaN or inf")
    subtasks, inverse = torch.unique(val_subtask, return_inverse=True)
    # Averaging matrix (M, S): column s holds 1/m_s on the rows of subtask s.
    weights = torch.zeros(len(val), len(subtasks), dtype=torch.float32)
    weights[torch.arange(len(val)), inverse] = 1.0
    weights /= weights.sum(0, keepdim=True)
    val_mean = weights.T @ val.float()  # (S, d): mean of inner products = inner product with the mean
    out = torch.empty(len(train), len(subtasks), dtype=torch.float32)
    for start in range(0, len(train), chunk):
        out[start : start + chunk] = train[start : start + chunk].float() @ val_mean.T
    return out


def influence_scores(train: torch.Tensor, val: torch.Tensor, val_subtask: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Scores (N,) for unit-norm train features (N, d) against validation features (M, d).

    ``val_subtask`` (M,) gives each validation row's subtask; the score is the
    max over subtasks of the mean inner product with that subtask's rows
    (``(train @ val.T).reshape(N, S, m).mean(-1).max(-1)`` when subtasks are
    contiguous and equal-sized). NaN train rows (failed samples) stay NaN.
    """
    return subtask_scores(train, val, val_subtask, chunk).max(dim=1).values
