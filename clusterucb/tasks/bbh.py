"""BIG-Bench Hard: 27 reasoning tasks, 3-shot chain of thought, exact match of the extracted answer (spec §1.3, §8).

Validation: LESS's builder on ``bbh-three-shot.json``: for each task and each of
its three exemplars, the other two as in-context examples, the exemplar's
question as the prompt and its chain of thought as the completion (81 examples).
Evaluation: open-instruct's: the task's ``cot-prompts`` file (minus its canary
header) and the question, greedy, the answer taken by the official regex, exact
match ignoring case and punctuation, the unweighted mean over tasks.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from clusterucb.data.sources import DataError, read_json
from clusterucb.tasks.base import (
    TaskSettings,
    example_id,
    fields_of,
    fit_shots,
    per_subtask_subset,
    prediction,
    single_file,
    test_row,
    validation_row,
)

NAME = "bbh"
ANSWER = re.compile(r"[t|T]he answer is (.*?)\.")  # open-instruct's, character class and all
HEADER_LINES = 2  # the canary line and "-----" of every cot-prompts file
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def split_exemplar(text: str) -> tuple[str, str]:
    """'Q: ...\\nA: ...' -> ('Q: ...', ' ...') at the first '\\nA:'."""
    question, sep, answer = text.partition("\nA:")
    if not sep:
        raise DataError(f"bbh exemplar without '\\nA:': {text[:80]!r}")
    return question, answer


def parse_cot_prompt(text: str) -> tuple[str, list[str]]:
    """A cot-prompts text (header removed) -> (task description, exemplars), split at the blank lines before 'Q:'."""
    description, exemplars = [], []
    for field in text.split("\n\n"):
        if field.startswith("Q:"):
            exemplars.append(field)
        elif exemplars:
            exemplars[-1] += "\n\n" + field  # a blank line inside an exemplar
        else:
            description.append(field)
    return "\n\n".join(description), exemplars


def task_prompt(description: str, exemplars: list[str], shots: int) -> str:
    return "\n\n".join([description, *exemplars[:shots]])


def read_cot_prompt(path: Path) -> str:
    return "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[HEADER_LINES:])


def read_task(path: Path) -> list[dict]:
    document = read_json(path)  # names the file when it is not JSON
    examples = document.get("examples") if isinstance(document, dict) else None
    if not isinstance(examples, list):
        raise DataError(f"{path}: expected a JSON object with an 'examples' list")
    for number, example in enumerate(examples, start=1):
        if not isinstance(example, dict) or not isinstance(example.get("input"), str) or not isinstance(example.get("target"), str):
            raise DataError(f"{path}: example {number}: expected string fields 'input' and 'target'")
    if not examples:
        raise DataError(f"{path}: 0 examples read")
    return examples


def extract_answer(output: str) -> str:
    """The official extraction: the text after 'the answer is' up to the first period, else the whole output."""
    match = ANSWER.search(output)
    return match.group(1).strip() if match else output.strip()


def normalize(text: str) -> str:
    """HF ``exact_match`` with ignore_case and ignore_punctuation (no whitespace stripping)."""
    return text.lower().translate(_PUNCTUATION)


def exact_match(prediction_: str, reference: str) -> bool:
    return normalize(prediction_) == normalize(reference)


def task_name(path: Path) -> str:
    return path.name.split(".")[0]


class Bbh:
    name = NAME
    metric = "exact_match"
    defaults = TaskSettings(n_val=3, max_per_subtask=None, n_shot=3, max_new_tokens=512)
    settings_used = frozenset({"n_val", "max_per_subtask", "n_shot", "max_new_tokens"})
    validation_settings = frozenset({"n_val"})
    test_settings = frozenset({"max_per_subtask"})

    def data_files(self) -> dict[str, str]:
        return {"tasks": "bbh/bbh/*.json", "cot_prompts": "bbh/cot-prompts/*.txt", "three_shot": "bbh/bbh-three-shot.json"}

    def _three_shot(self, files) -> dict[str, str]:
        path = single_file(files, "three_shot")
        data = read_json(path)
        if not isinstance(data, dict) or not data:
            raise DataError(f"{path}: expected a JSON object task -> few-shot prompt")
        return data

    def validation_examples(self, files, settings: TaskSettings, seed: int) -> list[dict]:
        rows = []
        for task, text in self._three_shot(files).items():  # file order, as the official builder
            fields_ = text.split("\n\n")
            exemplars, description = fields_[-3:], "\n\n".join(fields_[:-3])
            if settings.n_val > len(exemplars):
                raise ValueError(f"bbh: n_val={settings.n_val} exceeds the {len(exemplars)} exemplars of {task}")
            for i in range(settings.n_val):
                icl = "".join(q + "\nA:" + a + "\n\n" for q, a in map(split_exemplar, exemplars[:i] + exemplars[i + 1 :]))
                question, answer = split_exemplar(exemplars[i])
                rows.append(
                    validation_row(
                        example_id(NAME, "three_shot", task, question), task, description.strip() + "\n\n" + icl + question, "A:", answer
                    )
                )
        return rows

    def test_examples(self, files, settings: TaskSettings, seed: int) -> tuple[list[dict], dict]:
        """Capped examples per task (tasks in name order), and each task's CoT prompt."""
        prompts = {task_name(p): read_cot_prompt(p) for p in sorted(files["cot_prompts"])}
        missing = sorted({task_name(p) for p in files["tasks"]} - set(prompts))
        if missing:
            raise DataError(f"bbh: no cot-prompts file for {missing}")
        rows = [
            test_row(
                example_id(NAME, "test", task_name(path), e["input"]),
                task_name(path),
                e["input"],
                e["target"],
                description=parse_cot_prompt(prompts[task_name(path)])[0].strip(),
            )
            for path in sorted(files["tasks"])
            for e in read_task(path)
        ]
        return per_subtask_subset(rows, settings.max_per_subtask, seed), {"cot_prompts": prompts}

    def decontamination_texts(self, files) -> list[str]:
        inputs = [e["input"] for path in sorted(files["tasks"]) for e in read_task(path)]
        exemplars = [split_exemplar(x)[0].removeprefix("Q:") for text in self._three_shot(files).values() for x in text.split("\n\n")[-3:]]
        return inputs + exemplars

    def evaluate(self, lm, examples: list[dict], shared: dict, settings: TaskSettings) -> tuple[dict, list[dict]]:
        parsed = {task: parse_cot_prompt(text) for task, text in shared["cot_prompts"].items()}

        def user(example, shots):
            description, exemplars = parsed[example["subtask"]]
            return task_prompt(description, exemplars, shots).strip() + "\n\nQ: " + example["question"]

        fitted = [
            fit_shots(
                lambda k, e=e: lm.chat.prompt(user(e, k), "A:"),
                settings.n_shot,
                lambda p: lm.fits(p, settings.max_new_tokens),
                e["example_id"],
            )
            for e in examples
        ]
        # Under a chat format open-instruct sets no stop sequence: the answer ends at EOS or the budget.
        outputs = lm.greedy([p for p, _ in fitted], settings.max_new_tokens, desc=NAME)
        records = []
        for example, output, (_, shots) in zip(examples, outputs, fitted):
            answer = extract_answer(output)
            records.append(prediction(example, shots, output, answer, exact_match(answer, example["reference"])))
        per_task: dict[str, list[float]] = {}
        for record in records:
            per_task.setdefault(record["subtask"], []).append(record["score"])
        task_em = {t: sum(v) / len(v) for t, v in sorted(per_task.items())}
        metrics = {
            "exact_match": sum(task_em.values()) / len(task_em),  # unweighted over tasks, as average_exact_match
            "exact_match_micro": sum(r["score"] for r in records) / len(records),
            "per_task": task_em,
            "n_examples": len(records),
            "n_prompts_with_fewer_shots": sum(1 for _, shots in fitted if shots < settings.n_shot),
        }
        return metrics, records

    def loss_example(self, example: dict) -> tuple[str, str, str]:
        """Zero-shot: the task description and the question; the reference answer in the exemplars' closing words."""
        return fields_of(example)["description"] + "\n\nQ: " + example["question"], "A:", f" So the answer is {example['reference']}."


TASK = Bbh()
