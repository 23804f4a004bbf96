"""HumanEval: 164 Python functions to complete, scored by running their unit tests in a sandbox (spec §1.3, §8).

Validation, as the official code: ``random.seed(42); random.sample(problems, 10)`` of
the 164 *test* problems, with the HumanEvalPack instruction as the user turn and
the canonical solution as the completion. Those problems are then **left out of
the evaluation** (the official code evaluates on all 164, so it scores on the
problems it selected data for). Evaluation: open-instruct's chat prompt
(instruction, then "Here is the function:" and the problem's prompt in a code
block), generation cut at its stop sequences, each program
(prompt + completion + tests + ``check(entry_point)``) run by
:mod:`clusterucb.tasks.sandbox`; pass@k by the unbiased estimator.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter

from clusterucb.data.sources import DataError, iter_records
from clusterucb.tasks.base import (
    Sampling,
    TaskSettings,
    example_id,
    fields_of,
    pass_at_k,
    prediction,
    seeded_subset,
    single_file,
    test_row,
    validation_row,
)

NAME = "humaneval"
VALIDATION_SEED = 42  # the official builder's random.seed(42), whatever the run's seed
ANSWER_START = "Here is the function:\n\n```python\n"
STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")  # open-instruct's, with the code fence of the chat prompt
PAPER_SAMPLING = (Sampling(n=20, temperature=0.1, top_p=0.95, k=(1,)), Sampling(n=20, temperature=0.8, top_p=0.95, k=(10,)))


def read_problems(problems_path, pack_path) -> list[dict]:
    """HumanEval problems in file order, each with its HumanEvalPack instruction (Python/<i> = HumanEval/<i>)."""
    problems = []
    for row, record in iter_records(problems_path):
        if isinstance(record, DataError):
            raise record
        missing = {"task_id", "prompt", "entry_point", "canonical_solution", "test"} - set(record)
        if missing:
            raise DataError(f"{problems_path}: row {row}: missing field(s) {sorted(missing)}")
        problems.append(record)
    instructions = {}
    for row, record in iter_records(pack_path):
        if isinstance(record, DataError):
            raise record
        if "task_id" not in record or "instruction" not in record:
            raise DataError(f"{pack_path}: row {row}: missing 'task_id' or 'instruction'")
        instructions[record["task_id"].replace("Python/", "HumanEval/")] = record["instruction"]
    lacking = [p["task_id"] for p in problems if p["task_id"] not in instructions]
    if lacking:
        raise DataError(f"{pack_path}: no instruction for {lacking[:5]} ({len(lacking)} problems)")
    if not problems:
        raise DataError(f"{problems_path}: 0 rows read")
    return [{**p, "instruction": instructions[p["task_id"]]} for p in problems]


def validation_problems(problems: list[dict], n_val: int) -> list[dict]:
    """The official draw: ``random.seed(42); random.sample(list(problems.items()), n_val)``."""
    return random.Random(VALIDATION_SEED).sample(problems, n_val)


def program(problem: dict, completion: str) -> str:
    """What human-eval executes: the prompt, the completion, the tests and the call of ``check``."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})" + "\n"


def sample_seed(seed: int, task_id: str, pass_index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{task_id}:{pass_index}".encode()).digest()[:4], "little")


class HumanEval:
    name = NAME
    metric = "pass@1"
    defaults = TaskSettings(n_val=10, max_per_subtask=None, max_new_tokens=512, sampling=PAPER_SAMPLING, timeout_s=3.0)
    settings_used = frozenset({"n_val", "max_per_subtask", "max_new_tokens", "sampling", "timeout_s"})
    validation_settings = frozenset({"n_val"})
    test_settings = frozenset({"max_per_subtask", "n_val"})  # the test set leaves out the n_val validation problems

    def data_files(self) -> dict[str, str]:
        return {"problems": "humaneval/HumanEval.jsonl.gz", "pack": "humaneval/humanevalpack.jsonl"}

    def _problems(self, files) -> list[dict]:
        return read_problems(single_file(files, "problems"), single_file(files, "pack"))

    def validation_examples(self, files, settings: TaskSettings, seed: int) -> list[dict]:
        return [
            validation_row(
                example_id(NAME, "test", p["task_id"]),
                NAME,
                p["instruction"],
                ANSWER_START + p["prompt"],
                p["canonical_solution"] + "\n```",
            )
            for p in validation_problems(self._problems(files), settings.n_val)
        ]

    def test_examples(self, files, settings: TaskSettings, seed: int) -> tuple[list[dict], dict]:
        """The problems not drawn for validation (capped); the excluded task ids go in ``shared``."""
        problems = self._problems(files)
        held = {p["task_id"] for p in validation_problems(problems, settings.n_val)}
        remaining = [p for p in problems if p["task_id"] not in held]
        rows = [
            test_row(
                example_id(NAME, "test", p["task_id"]),
                NAME,
                p["prompt"],
                p["canonical_solution"],
                task_id=p["task_id"],
                prompt=p["prompt"],
                instruction=p["instruction"],
                test=p["test"],
                entry_point=p["entry_point"],
            )
            for p in seeded_subset(remaining, settings.max_per_subtask, seed)
        ]
        return rows, {"excluded_validation_problems": sorted(held, key=lambda t: int(t.split("/")[1]))}

    def decontamination_texts(self, files) -> list[str]:
        return [p["prompt"] for p in self._problems(files)]

    def evaluate(self, lm, examples: list[dict], shared: dict, settings: TaskSettings) -> tuple[dict, list[dict]]:
        from clusterucb.tasks.sandbox import SandboxLimits, probe_isolation, run_programs

        problems = [fields_of(e) for e in examples]
        prompts = [lm.chat.prompt(p["instruction"], ANSWER_START + p["prompt"]) for p in problems]
        passes = [Sampling(n=1, temperature=0.0, top_p=1.0, k=(1,))] if settings.sampling == "greedy" else list(settings.sampling)
        samples: list[list[list[str]]] = []  # pass -> problem -> completions
        for index, spec in enumerate(passes):
            if settings.sampling == "greedy":
                samples.append([[o] for o in lm.greedy(prompts, settings.max_new_tokens, STOPS, desc=NAME)])
            else:
                samples.append(
                    [
                        lm.sample(
                            prompt,
                            spec.n,
                            spec.temperature,
                            spec.top_p,
                            settings.max_new_tokens,
                            STOPS,
                            sample_seed(lm.seed, p["task_id"], index),
                        )
                        for prompt, p in zip(prompts, problems)
                    ]
                )
        isolation = probe_isolation("auto")
        sources = [program(p, c) for per_problem in samples for p, completions in zip(problems, per_problem) for c in completions]
        results = iter(run_programs(sources, SandboxLimits(timeout_s=settings.timeout_s), workers=max(1, lm.workers), isolation=isolation))
        passed = [[[next(results) for _ in completions] for completions in per_problem] for per_problem in samples]
        metrics: dict = {}
        for spec, per_problem in zip(passes, passed):
            for k in spec.k:
                metrics[f"pass@{k}"] = sum(pass_at_k(spec.n, sum(r.passed for r in rs), k) for rs in per_problem) / len(per_problem)
        statuses = Counter(r.status for per_problem in passed for rs in per_problem for r in rs)
        records = []
        for i, example in enumerate(examples):
            first = passed[0][i]
            details = {
                f"pass_{j}": {"temperature": spec.temperature, "outputs": samples[j][i], "statuses": [r.status for r in passed[j][i]]}
                for j, spec in enumerate(passes)
            }
            records.append(prediction(example, 0, samples[0][i][0], first[0].status, sum(r.passed for r in first) / len(first), **details))
        metrics.update(
            {
                "n_examples": len(examples),
                "decoding": settings.as_dict()["sampling"],
                "programs_run": sum(statuses.values()),
                "program_statuses": dict(statuses),
                "sandbox": isolation.as_dict(),
                "excluded_validation_problems": shared.get("excluded_validation_problems", []),
            }
        )
        return metrics, records

    def loss_example(self, example: dict) -> tuple[str, str, str]:
        problem = fields_of(example)
        return problem["instruction"], ANSWER_START + problem["prompt"], example["reference"] + "\n```"


TASK = HumanEval()
