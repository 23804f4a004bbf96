"""What every target task provides, and the row formats the workflow stores for it.

A task module (``clusterucb/tasks/<name>.py``) defines ``TASK``, an object with:

- ``name``, ``metric`` (the headline metric in ``metrics.json``), ``defaults``
  (a :class:`TaskSettings` with the paper's values) and ``settings_used`` (the
  settings it reads; any other key set for it in the config is an error), of which
  ``validation_settings`` and ``test_settings`` are those its validation and test sets
  read (so that an evaluation knob never rebuilds the validation set and what follows);
- ``data_files()``: the staged files it reads, by role, relative to ``datasets_dir``;
- ``validation_examples(files, settings, seed)``: the gradient targets, subtask-contiguous;
- ``test_examples(files, settings, seed)``: ``(examples, shared)``, the evaluated test
  examples and what their evaluation needs besides them (exemplars, prompts), JSON-able;
- ``decontamination_texts(files)``: texts no pool example may contain (its whole
  validation source and its *full* test split, so that neither ``n_val`` nor the
  evaluation caps ever change the pool);
- ``evaluate(lm, examples, shared, settings)``: ``(metrics, records)`` on a :class:`~clusterucb.models.lm.LanguageModel`;
- ``loss_example(example)``: ``(user, assistant_prefix, completion)`` whose completion
  NLL is the target loss (the validation format applied to a test example).

Nothing outside the task modules names a task.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Files = Mapping[str, list[Path]]


@dataclass(frozen=True)
class Sampling:
    """One sampled-generation pass: ``n`` samples per problem at ``temperature`` / ``top_p``, scored as pass@k for each k."""

    n: int
    temperature: float
    top_p: float
    k: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sampling:
        unknown = set(d) - {"n", "temperature", "top_p", "k"}
        if unknown:
            raise ValueError(f"unknown sampling key(s) {sorted(unknown)} (n, temperature, top_p, k)")
        spec = cls(int(d["n"]), float(d["temperature"]), float(d.get("top_p", 1.0)), tuple(int(k) for k in d["k"]))
        if spec.n < 1 or spec.temperature <= 0 or not 0 < spec.top_p <= 1 or not spec.k or any(k < 1 or k > spec.n for k in spec.k):
            raise ValueError(f"invalid sampling {dict(d)}: need n >= 1, temperature > 0, 0 < top_p <= 1, 1 <= k <= n")
        return spec


@dataclass(frozen=True)
class TaskSettings:
    """Knobs of a task's validation set and evaluation; ``None`` where the task does not use one."""

    n_val: int | None = None  # validation examples per subtask
    max_per_subtask: int | None = None  # evaluated test examples per subtask (None: all)
    n_shot: int | None = None  # exemplars in the evaluation prompt
    max_new_tokens: int | None = None  # generation budget per answer
    max_context_tokens: int | None = None  # passage truncation (tokens)
    sampling: str | tuple[Sampling, ...] | None = None  # "greedy", or sampled passes (pass@k)
    timeout_s: float | None = None  # per generated program (code execution)
    task_metric: bool = True  # False: the target loss only (no generation)

    @property
    def sampled_sequences(self) -> int | None:
        """The most sequences one prompt is sampled into at once (the largest pass@k's n); None without sampling."""
        return max(p.n for p in self.sampling) if isinstance(self.sampling, tuple) else None

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [{"n": s.n, "temperature": s.temperature, "top_p": s.top_p, "k": list(s.k)} for s in value]
            out[f.name] = value
        return out


SETTING_NAMES = tuple(f.name for f in fields(TaskSettings))
EVERY_TASK = frozenset({"task_metric"})  # settings every task reads (the evaluation stage applies them)


def resolve_settings(task, overrides: Mapping[str, Any] | None) -> TaskSettings:
    """The task's defaults with the config's overrides; a setting the task does not use is an error naming it."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for task {task.name!r} (known: {', '.join(SETTING_NAMES)})")
    unused = sorted(k for k, v in overrides.items() if k not in task.settings_used and k not in EVERY_TASK and v is not None)
    if unused:
        raise ValueError(f"task {task.name!r} does not use {unused}; it reads {sorted(task.settings_used)}")
    values = {k: v for k, v in overrides.items() if v is not None}
    if "sampling" in values and values["sampling"] != "greedy":
        passes = tuple(Sampling.from_dict(s) for s in values["sampling"])
        ks = [k for s in passes for k in s.k]
        if len(ks) != len(set(ks)):
            raise ValueError(f"task {task.name!r}: each pass@k may come from one sampling pass only, got k = {ks}")
        values["sampling"] = passes
    return replace(task.defaults, **values)


class TargetTask(Protocol):
    name: str
    metric: str
    defaults: TaskSettings
    settings_used: frozenset[str]
    validation_settings: frozenset[str]
    test_settings: frozenset[str]

    def data_files(self) -> dict[str, str]: ...

    def validation_examples(self, files: Files, settings: TaskSettings, seed: int) -> list[dict]: ...

    def test_examples(self, files: Files, settings: TaskSettings, seed: int) -> tuple[list[dict], dict]: ...

    def decontamination_texts(self, files: Files) -> list[str]: ...

    def evaluate(self, lm, examples: list[dict], shared: dict, settings: TaskSettings) -> tuple[dict, list[dict]]: ...

    def loss_example(self, example: dict) -> tuple[str, str, str]: ...


# ---------------------------------------------------------------- rows


def example_id(task: str, split: str, *parts: str) -> str:
    """Stable id from the content (never a row number): ``<task>_<split>-<sha256[:16]>``."""
    blob = json.dumps(parts, ensure_ascii=False).encode()
    return f"{task}_{split}-{hashlib.sha256(blob).hexdigest()[:16]}"


def validation_row(example_id: str, subtask: str, user: str, assistant_prefix: str, completion: str) -> dict:
    return {"example_id": example_id, "subtask": subtask, "user": user, "assistant_prefix": assistant_prefix, "completion": completion}


def test_row(example_id: str, subtask: str, question: str, reference: str, **fields_: Any) -> dict:
    """``question``: the text shown and matched; ``reference``: the gold answer; task-specific ``fields`` as JSON."""
    return {
        "example_id": example_id,
        "subtask": subtask,
        "question": question,
        "reference": reference,
        "fields": json.dumps(fields_, ensure_ascii=False),
    }


def fields_of(row: Mapping[str, Any]) -> dict:
    return json.loads(row["fields"])


def validation_schema():
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("subtask", pa.string(), nullable=False),
            pa.field("user", pa.string(), nullable=False),
            pa.field("assistant_prefix", pa.string(), nullable=False),
            pa.field("completion", pa.string(), nullable=False),
        ]
    )


def test_schema():
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("subtask", pa.string(), nullable=False),
            pa.field("question", pa.string(), nullable=False),
            pa.field("reference", pa.string(), nullable=False),
            pa.field("fields", pa.string(), nullable=False),  # JSON: what the task's evaluation needs
        ]
    )


def prediction_schema():
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("subtask", pa.string(), nullable=False),
            pa.field("n_shot", pa.int32()),
            pa.field("output", pa.string()),  # the model's text (the first sample for sampled tasks)
            pa.field("prediction", pa.string()),  # what was extracted from it
            pa.field("reference", pa.string()),
            pa.field("score", pa.float64()),  # 1/0 correct, F1, or the share of samples passing
            pa.field("details", pa.string()),  # JSON: per-sample outputs, statuses ...
        ]
    )


def prediction(example: Mapping[str, Any], n_shot: int | None, output: str, prediction_: str | None, score: float, **details: Any) -> dict:
    return {
        "example_id": example["example_id"],
        "subtask": example["subtask"],
        "n_shot": n_shot,
        "output": output,
        "prediction": prediction_,
        "reference": example["reference"],
        "score": float(score),
        "details": json.dumps(details, ensure_ascii=False) if details else None,
    }


# ---------------------------------------------------------------- helpers


def seeded_subset(rows: Sequence, n: int | None, seed: int, salt: str = "") -> list:
    """At most ``n`` rows drawn without replacement (seed and ``salt``, e.g. the subtask), kept in file order."""
    if n is None or n >= len(rows):
        return list(rows)
    digest = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "little")
    chosen = np.sort(np.random.default_rng([seed, digest]).choice(len(rows), size=n, replace=False))
    return [rows[i] for i in chosen]


def per_subtask_subset(rows: Sequence[dict], n: int | None, seed: int) -> list[dict]:
    """``seeded_subset`` within each subtask; subtasks stay contiguous, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["subtask"], []).append(row)
    return [row for name, group in groups.items() for row in seeded_subset(group, n, seed, name)]


def single_file(files: Files, role: str) -> Path:
    paths = files.get(role) or []
    if len(paths) != 1:
        raise ValueError(f"expected exactly one file for {role!r}, got {[str(p) for p in paths]}")
    return paths[0]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def fit_shots(render, n_shot: int, fits, example_id_: str = "") -> tuple[str, int]:
    """``render(shots)`` with the most shots (<= n_shot) for which ``fits(prompt)``; an error naming the example if none fits."""
    for shots in range(n_shot, -1, -1):
        prompt = render(shots)
        if fits(prompt):
            return prompt, shots
    raise ValueError(f"example {example_id_}: the prompt does not fit the model's context even without exemplars")
