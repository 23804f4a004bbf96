"""The downstream effect over training seeds: each method's target loss as mean and std over its seeds, paired
differences against uniform draws and the static selection with a bootstrap interval, and the share of
Dynamic's improvement over the base model it recovers.

A run trained with another seed is named ``<run>__train_seed-<s>`` (clusterucb/selection/runs.py); its
``variant`` is the name without that part, so the seeds of one method fall in one group.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

SEED_PART = re.compile(r"__train_seed-\d+")
BASELINES = ("random_draw", "static")  # the paired differences' references, where configured
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 10_000
SIGN_FLIP_EXACT = 16  # seeds up to which the sign-flip test enumerates every sign pattern
# Dynamic's gain over the base model counts as a gain (and a share of it as a measurement) only where it
# exceeds this many standard errors of Dynamic's mean loss over its seeds: a share of a gain inside the seed
# noise is noise divided by noise (it reached 1.77 and -18.96 on MMLU, where Dynamic's gain was 0.014 ± 0.013).
GAIN_STANDARD_ERRORS = 2.0


def variant_of(run: str) -> str:
    return SEED_PART.sub("", run)


def bootstrap_interval(differences: np.ndarray, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``differences`` (one per seed), resampling seeds."""
    rng = np.random.default_rng(seed)
    means = rng.choice(differences, size=(BOOTSTRAP_RESAMPLES, len(differences)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def sign_flip_p(differences: np.ndarray) -> float:
    """Exact two-sided p-value of the paired sign-flip (permutation) test: the share of the 2^n sign patterns
    whose mean is at least as far from 0 as the observed one. With n seeds it cannot go below 2 / 2^n (0.25
    at 3 seeds), so few seeds never show a difference beyond their noise, however consistent."""
    n = len(differences)
    observed = abs(differences.mean()) - 1e-12
    if n <= SIGN_FLIP_EXACT:
        signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * n)).reshape(n, -1).T
        return float((np.abs((signs * np.abs(differences)).mean(axis=1)) >= observed).mean())
    # Too many seeds to enumerate 2^n patterns: as many random ones, the observed pattern counted among them.
    signs = np.random.default_rng(BOOTSTRAP_SEED).choice([-1.0, 1.0], size=(2**SIGN_FLIP_EXACT, n))
    extreme = int((np.abs((signs * np.abs(differences)).mean(axis=1)) >= observed).sum())
    return (extreme + 1) / (len(signs) + 1)


def _paired(task_rows: pd.DataFrame, variant: str, baseline: str) -> str:
    """Mean of (variant - baseline) target loss over the seeds both have, with its bootstrap interval."""
    mine = task_rows[task_rows.variant == variant].set_index("train_seed").target_loss
    theirs = task_rows[task_rows.variant == baseline].set_index("train_seed").target_loss
    common = mine.index.intersection(theirs.index)
    if variant == baseline or len(common) == 0:
        return ""
    differences = (mine[common] - theirs[common]).to_numpy(dtype=float)
    if len(common) == 1:
        return f"{differences[0]:+.4f} (1 seed)"
    low, high = bootstrap_interval(differences)
    p_value = sign_flip_p(differences)
    # Beyond seed noise: the interval excludes 0 and the exact paired test agrees (a percentile bootstrap over
    # 2 or 3 seeds excludes 0 whenever every difference has the same sign).
    beyond = " *" if (high < 0 or low > 0) and p_value <= 0.05 else ""
    return f"{differences.mean():+.4f} [{low:+.4f}, {high:+.4f}] p={p_value:.2f}{beyond}"


def seed_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per task and method variant, over its training seeds; ``frame`` is the comparison table
    (columns task, run, method, train_seed, score, target_loss, pool_gradients). Lower target loss is better:
    a negative paired difference favours the row's method; ``*`` marks an interval that excludes 0."""
    frame = frame.assign(variant=[variant_of(r) for r in frame.run])
    rows = []
    for task, task_rows in frame.groupby("task", sort=False):
        base = task_rows[task_rows.method == "base"].target_loss
        dynamic = task_rows[task_rows.variant == "dynamic"].target_loss
        dynamic_gain = float(base.mean() - dynamic.mean()) if len(base) and len(dynamic) else np.nan
        has_gain = dynamic_gain > _noise_floor(dynamic.to_numpy(dtype=float))
        for variant, group in task_rows.groupby("variant", sort=False):
            row = {
                "task": task,
                "variant": variant,
                "method": group.method.iloc[0],
                "seeds": len(group),
                "target_loss": float(group.target_loss.mean()),
                "target_loss_std": float(group.target_loss.std()) if len(group) > 1 else np.nan,
                "score": float(pd.to_numeric(group.score, errors="coerce").mean()),
                "score_std": float(pd.to_numeric(group.score, errors="coerce").std()) if len(group) > 1 else np.nan,
                "pool_gradients": float(group.pool_gradients.mean()),
                # Share of Dynamic's improvement over the base model (1 = all of it), at the means over seeds;
                # undefined where Dynamic does not improve on the base model beyond its seed noise.
                "of_dynamic_gain": float((base.mean() - group.target_loss.mean()) / dynamic_gain) if has_gain else np.nan,
            }
            for baseline in BASELINES:
                row[f"vs_{baseline}"] = _paired(task_rows, variant, baseline) if variant != "base" else ""
            rows.append(row)
    return pd.DataFrame(rows)


def _noise_floor(dynamic_losses: np.ndarray) -> float:
    """The gain Dynamic must exceed: GAIN_STANDARD_ERRORS standard errors of its mean over seeds; 0 with one
    seed, which gives no spread to measure (any improvement then counts)."""
    if len(dynamic_losses) < 2:
        return 0.0
    return GAIN_STANDARD_ERRORS * float(dynamic_losses.std(ddof=1)) / np.sqrt(len(dynamic_losses))


def mean_over_tasks(summary: pd.DataFrame) -> pd.DataFrame:
    """Each variant's share of Dynamic's gain averaged over the tasks where it is defined (``tasks_with_share``
    of its ``tasks``), and its pool gradients averaged over all of its tasks."""
    grouped = summary.groupby("variant", sort=False)
    return pd.DataFrame(
        {
            "variant": list(grouped.groups),
            "tasks": grouped.size().to_numpy(),
            "tasks_with_share": grouped.of_dynamic_gain.count().to_numpy(),
            "of_dynamic_gain": grouped.of_dynamic_gain.mean().to_numpy(),
            "pool_gradients": grouped.pool_gradients.mean().to_numpy(),
        }
    )
