"""The files a stage reads or writes, grouped by what they are, so a stage takes a few named objects."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Checkpoint:
    """A LoRA checkpoint on disk: its adapter folder and AdamW state; ``name`` is where it lives under results/."""

    adapter_dir: str
    optimizer: str
    name: str = ""


@dataclass(frozen=True)
class TrainingOutputs:
    """What a training stage writes: the adapter folder, the AdamW state and the per-step log."""

    adapter_dir: str
    optimizer: str
    log: str


@dataclass(frozen=True)
class Validation:
    """A target's validation features at a checkpoint (tensors and their index) and its tokenized validation set."""

    tensors: str
    index: str
    tokens: str


@dataclass(frozen=True)
class Pool:
    """The pool: its tokens (memory-mapped Arrow) and its table (pool.parquet, the rows' own ids)."""

    tokens: str
    table: str


@dataclass(frozen=True)
class Selecting:
    """Which selection a stage makes: a target task, a run and an epoch."""

    task: str
    run: str
    epoch: int
