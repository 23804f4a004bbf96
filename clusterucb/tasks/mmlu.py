"""MMLU: 57 subjects of four-choice questions; 5-shot from dev, answer = argmax of the next-token logits over A-D (spec §1.3, §8).

Validation: the first ``n_val`` (5) dev rows of each subject, zero-shot, in the
official builder's format. Evaluation: open-instruct's k-shot prompt from the
same subject's dev rows (fewer while it exceeds the context), scored by the
next-token logits of " A" ... " D"; accuracy micro-averaged over all questions,
per-subject accuracies beside it.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from clusterucb.data.sources import DataError
from clusterucb.tasks.base import TaskSettings, example_id, fields_of, fit_shots, per_subtask_subset, prediction, test_row, validation_row

NAME = "mmlu"
CHOICES = ("A", "B", "C", "D")
ANSWER_PREFIX = "The answer is:"
SHORT_QUESTION_WORDS = 8  # shorter questions are matched with their choices (generic phrasings would hit any text)
MAX_PROMPT_TOKENS = 2048  # open-instruct drops shots while the prompt exceeds 2048 tokens (or the model's context)


def read_csv(path: Path) -> list[dict]:
    """Rows of a headerless MMLU CSV (question, A, B, C, D, answer letter); a bad row raises naming file and row."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for number, record in enumerate(csv.reader(handle), start=1):
            if len(record) != 6 or record[5].strip() not in CHOICES or not record[0].strip():
                raise DataError(f"{path}: row {number}: expected question, four choices and an answer letter A-D, got {record!r}")
            rows.append({"question": record[0], "choices": record[1:5], "answer": record[5].strip()})
    if not rows:
        raise DataError(f"{path}: 0 rows read")
    return rows


def subject_of(path: Path, suffix: str) -> str:
    match = re.fullmatch(rf"(.+)_{suffix}\.csv", path.name)
    if not match:
        raise DataError(f"{path}: expected a file named <subject>_{suffix}.csv")
    return match.group(1)


def by_subject(paths: list[Path], suffix: str) -> dict[str, list[dict]]:
    return {subject_of(p, suffix): read_csv(p) for p in sorted(paths)}


def format_subject(subject: str) -> str:
    """' abstract algebra' (open-instruct keeps the leading space, hence 'about  abstract algebra')."""
    return "".join(" " + part for part in subject.split("_"))


def format_example(row: dict, include_answer: bool) -> str:
    text = row["question"]
    for letter, choice in zip(CHOICES, row["choices"]):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if include_answer:
        text += f" {row['answer']}\n\n"
    return text


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def fewshot_user(subject: str, dev: list[dict], row: dict, k: int) -> str:
    return header(subject) + "".join(format_example(d, True) for d in dev[:k]) + format_example(row, False)


class Mmlu:
    name = NAME
    metric = "accuracy"
    defaults = TaskSettings(n_val=5, max_per_subtask=None, n_shot=5)
    settings_used = frozenset({"n_val", "max_per_subtask", "n_shot"})
    validation_settings = frozenset({"n_val"})
    test_settings = frozenset({"max_per_subtask"})

    def data_files(self) -> dict[str, str]:
        return {"dev": "mmlu/dev/*_dev.csv", "test": "mmlu/test/*_test.csv"}

    def _dev(self, files) -> dict[str, list[dict]]:
        dev = by_subject(files["dev"], "dev")
        test_subjects = {subject_of(p, "test") for p in files["test"]}
        if set(dev) != test_subjects:
            raise DataError(f"mmlu: dev and test subjects differ: {sorted(set(dev) ^ test_subjects)}")
        return dev

    def validation_examples(self, files, settings: TaskSettings, seed: int) -> list[dict]:
        rows = []
        for subject, dev in self._dev(files).items():  # subjects sorted, as the official builder
            if settings.n_val > len(dev):
                raise ValueError(f"mmlu: n_val={settings.n_val} exceeds the {len(dev)} dev rows of {subject}")
            for row in dev[: settings.n_val]:
                user = header(subject) + format_example(row, False)
                rows.append(
                    validation_row(example_id(NAME, "dev", subject, row["question"]), subject, user, ANSWER_PREFIX, " " + row["answer"])
                )
        return rows

    def test_examples(self, files, settings: TaskSettings, seed: int) -> tuple[list[dict], dict]:
        """The capped test questions per subject, and every subject's dev rows (the exemplars)."""
        rows = [
            test_row(
                example_id(NAME, "test", subject, r["question"], *r["choices"]), subject, r["question"], r["answer"], choices=r["choices"]
            )
            for subject, subject_rows in by_subject(files["test"], "test").items()
            for r in subject_rows
        ]
        return per_subtask_subset(rows, settings.max_per_subtask, seed), {"dev": self._dev(files)}

    def decontamination_texts(self, files) -> list[str]:
        rows = [r for part in ("dev", "test") for rs in by_subject(files[part], part).values() for r in rs]
        return [
            r["question"] if len(r["question"].split()) >= SHORT_QUESTION_WORDS else " ".join([r["question"], *r["choices"]]) for r in rows
        ]

    def evaluate(self, lm, examples: list[dict], shared: dict, settings: TaskSettings) -> tuple[dict, list[dict]]:
        """k-shot prompts (fewer shots while over the context), argmax over the next-token logits of ' A'..' D'."""
        dev = shared["dev"]
        candidates = [lm.last_token_id(" " + c) for c in CHOICES]

        def fits(prompt):
            return lm.fits(prompt, 1) and lm.n_tokens(prompt) <= MAX_PROMPT_TOKENS

        fitted = []
        for e in examples:
            row = {"question": e["question"], "choices": fields_of(e)["choices"], "answer": e["reference"]}
            fitted.append(
                fit_shots(
                    lambda k, s=e["subtask"], r=row: lm.chat.prompt(fewshot_user(s, dev[s], r, k), ANSWER_PREFIX),
                    settings.n_shot,
                    fits,
                    e["example_id"],
                )
            )
        logits = lm.next_token_logits([p for p, _ in fitted], candidates)
        records = []
        for example, (_, shots), row in zip(examples, fitted, logits.argmax(1).tolist()):
            letter = CHOICES[row]
            records.append(prediction(example, shots, letter, letter, letter == example["reference"]))
        per_subject: dict[str, list[float]] = {}
        for record in records:
            per_subject.setdefault(record["subtask"], []).append(record["score"])
        subject_acc = {s: sum(v) / len(v) for s, v in sorted(per_subject.items())}
        metrics = {
            "accuracy": sum(r["score"] for r in records) / len(records),  # micro average, as open-instruct's average_acc
            "accuracy_macro": sum(subject_acc.values()) / len(subject_acc),
            "per_subject": subject_acc,
            "n_examples": len(records),
            "n_prompts_with_fewer_shots": sum(1 for _, shots in fitted if shots < settings.n_shot),
        }
        return metrics, records

    def loss_example(self, example: dict) -> tuple[str, str, str]:
        row = {"question": example["question"], "choices": fields_of(example)["choices"]}
        return header(example["subtask"]) + format_example(row, False), ANSWER_PREFIX, " " + example["reference"]


TASK = Mmlu()
