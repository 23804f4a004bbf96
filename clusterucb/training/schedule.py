"""The learning-rate schedule of LoRA training: HF's linear schedule with warmup over the whole planned run.

No torch here: the LESS selection (a CPU rule) computes its checkpoint weights from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def steps_per_epoch(n_examples: int, effective_batch: int) -> int:
    """Optimizer steps in one epoch; the last partial batch is dropped, as the HF Trainer does."""
    steps = n_examples // effective_batch
    if steps < 1:
        raise ValueError(f"{n_examples} examples are fewer than one effective batch of {effective_batch}")
    return steps


def linear_schedule(step: int, total_steps: int, warmup_steps: int) -> float:
    """HF ``get_linear_schedule_with_warmup`` multiplier at ``step`` (0-based)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@dataclass
class StepPlan:
    start_step: int  # global step at which this job starts
    n_steps: int  # optimizer steps this job takes
    total_steps: int  # steps of the whole planned run (for the LR schedule)
    warmup_steps: int


def plan_steps(start_step: int, n_steps: int, total_steps: int, warmup_ratio: float) -> StepPlan:
    return StepPlan(start_step, n_steps, total_steps, math.ceil(warmup_ratio * total_steps))


def learning_rates(lr: float, total_steps: int, warmup_ratio: float) -> np.ndarray:
    """The learning rate of every step (0-based) of a planned run of ``total_steps``."""
    warmup = plan_steps(0, total_steps, total_steps, warmup_ratio).warmup_steps
    return np.array([lr * linear_schedule(s, total_steps, warmup) for s in range(total_steps)])


def mean_lr_per_epoch(lr: float, per_epoch: int, n_epochs: int, warmup_ratio: float) -> np.ndarray:
    """Mean learning rate of each of ``n_epochs`` epochs of ``per_epoch`` steps under the linear schedule:
    what the LESS checkpoint weights are (spec §4), computed from the schedule rather than from a log."""
    return learning_rates(lr, per_epoch * n_epochs, warmup_ratio).reshape(n_epochs, per_epoch).mean(axis=1)
