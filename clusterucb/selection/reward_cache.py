"""Rewards of a budgeted re-selection kept on disk as they are computed, so a killed job resumes.

A re-selection is a deterministic function of its seed and its rewards: run
again with the rewards already computed looked up instead of recomputed, the
bandit makes the same choices and the job continues where it died, with the
same selection as an uninterrupted run. The log is append-only fixed-size
records (pool index, reward) flushed after each reward call; a record torn by
the kill is dropped on load. A ``key`` (everything the rewards depend on) is
stored beside it: a log written under another key is discarded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RECORD = np.dtype([("index", "<i8"), ("reward", "<f8")])


class RewardLog:
    """An append-only on-disk map pool index -> reward, under ``directory``."""

    def __init__(self, directory: str | os.PathLike, key: str):
        self.dir = Path(directory)
        self.path = self.dir / "rewards.bin"
        key_path = self.dir / "rewards.key.json"
        self.known: dict[int, float] = {}
        if self.path.exists() and key_path.exists() and json.loads(key_path.read_text()).get("key") == key:
            raw = self.path.read_bytes()
            whole = len(raw) - len(raw) % RECORD.itemsize  # a record torn by the kill is dropped
            records = np.frombuffer(raw[:whole], dtype=RECORD)
            self.known = dict(zip(records["index"].tolist(), records["reward"].tolist()))
            if whole != len(raw):
                with open(self.path, "r+b") as handle:
                    handle.truncate(whole)
            log.info("resumed: %d rewards of an interrupted run read from %s", len(self.known), self.path)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(b"")
            tmp = key_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key}))
            os.replace(tmp, key_path)
        self.reused = 0

    def wrap(self, reward_fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """``reward_fn`` computing only the indices not in the log, and logging what it computes."""

        def rewards(indices: np.ndarray) -> np.ndarray:
            indices = np.asarray(indices, dtype=np.int64)
            missing = np.array([i for i in indices.tolist() if i not in self.known], dtype=np.int64)
            self.reused += len(indices) - len(missing)
            if len(missing):
                computed = np.asarray(reward_fn(missing), dtype=np.float64)
                self._append(missing, computed)
            return np.array([self.known[i] for i in indices.tolist()], dtype=np.float64)

        return rewards

    def _append(self, indices: np.ndarray, rewards: np.ndarray) -> None:
        records = np.empty(len(indices), dtype=RECORD)
        records["index"], records["reward"] = indices, rewards
        with open(self.path, "ab") as handle:
            handle.write(records.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        self.known.update(zip(indices.tolist(), rewards.tolist()))
