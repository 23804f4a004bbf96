"""GSM8K: grade-school math word problems, 8-shot chain-of-thought, exact match of the last number (spec §1.3, §8).

Validation examples come from the *train* split (the official code samples them
from the test set, leaking the evaluation set into selection; spec §10.8): from
a fixed held-out part of it, the ``VAL_POOL`` train problems with the smallest
sha256 of their question. The whole held-out part and the whole test split are
removed from the pool, so ``n_val`` and the evaluation cap never change the pool.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from clusterucb.data.sources import DataError, iter_records
from clusterucb.tasks.base import (
    TaskSettings,
    example_id,
    fields_of,
    fit_shots,
    prediction,
    seeded_subset,
    single_file,
    test_row,
    validation_row,
)

NAME = "gsm8k"
VAL_POOL = 500  # held-out train problems the validation examples are drawn from
STOP = "\n\n"  # open-instruct's --stop_at_double_newline

# The 8 chain-of-thought exemplars of Wei et al. (2022), as used by the
# open-instruct / ClusterUCB GSM8K evaluation (eval/gsm/examplars.py).
COT_EXEMPLARS: list[tuple[str, str]] = [
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
        "been 21 - 15 = 6. So the answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
        "they had 74 - 35 = 39. So the answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. So the answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. So the answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to "
        "thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
        "were added. 9 + 20 is 29. So the answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
        "balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
        "he had 35 - 2 = 33 golf balls. So the answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        "left. 23 - 15 is 8. So the answer is 8.",
    ),
]

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
_GOLD = re.compile(r"####\s*-?[\d,]*\.?\d+\s*$")


def read_gsm8k(path: str | Path) -> list[dict[str, str]]:
    """All rows of a GSM8K JSONL file with a parsed gold answer; bad rows raise naming file and row."""
    rows = []
    for row, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        try:
            question = record["question"].strip()
            answer = record["answer"].strip()
        except (KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{path}: row {row}: expected string fields 'question' and 'answer' ({err!r})") from None
        if not question or not _GOLD.search(answer):
            raise DataError(f"{path}: row {row}: empty question or answer without a '#### <number>' line")
        rows.append({"question": question, "answer": answer, "gold": gold_answer(answer)})
    if not rows:
        raise DataError(f"{path}: 0 rows read")
    return rows


def gold_answer(answer: str) -> str:
    """The number after '####' in a GSM8K answer, without thousands separators."""
    return answer.split("####")[-1].strip().replace(",", "")


def held_out(train_rows: list[dict], size: int = VAL_POOL) -> list[dict]:
    """The fixed validation source: the ``size`` train problems with the smallest question hash, in file order."""
    ranked = sorted(range(len(train_rows)), key=lambda i: hashlib.sha256(train_rows[i]["question"].encode()).hexdigest())
    return [train_rows[i] for i in sorted(ranked[:size])]


def validation_example(question: str, answer: str) -> tuple[str, str, str]:
    """(user, assistant prefix, completion) of the official GSM validation builder (spec §1.3, ``replace_format=False``):
    the completion is the raw answer, <<calc>> annotations and '#### N' included."""
    return "Answer the following question.\n\nQuestion: " + question, "Answer: \n\n", answer


def fewshot_user(question: str, n_shot: int) -> str:
    """The n-shot CoT evaluation prompt's user turn (open-instruct eval/gsm); the assistant prefix is 'Answer:'."""
    if not 0 <= n_shot <= len(COT_EXEMPLARS):
        raise ValueError(f"n_shot must be in [0, {len(COT_EXEMPLARS)}], got {n_shot}")
    demos = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in COT_EXEMPLARS[:n_shot])
    body = "Answer the following questions.\n\n"
    if demos:
        body += demos + "\n\n"
    return body + "Question: " + question


def extract_prediction(output: str) -> str | None:
    """The last number in a model output, commas stripped (open-instruct GSM metric)."""
    numbers = _NUMBER.findall(output.replace(",", ""))
    if not numbers:
        return None
    value = numbers[-1]
    return value.rstrip(".") if value.endswith(".") else value


def is_correct(prediction_: str | None, gold: str) -> bool:
    if prediction_ is None:
        return False
    try:
        return float(prediction_) == float(gold)
    except ValueError:
        return prediction_ == gold


class Gsm8k:
    name = NAME
    metric = "exact_match"
    defaults = TaskSettings(n_val=50, max_per_subtask=None, n_shot=8, max_new_tokens=512)
    settings_used = frozenset({"n_val", "max_per_subtask", "n_shot", "max_new_tokens"})
    validation_settings = frozenset({"n_val"})
    test_settings = frozenset({"max_per_subtask"})

    def data_files(self) -> dict[str, str]:
        return {"train": "gsm8k/train.jsonl.gz", "test": "gsm8k/test.jsonl"}

    def validation_examples(self, files, settings: TaskSettings, seed: int) -> list[dict]:
        source = held_out(read_gsm8k(single_file(files, "train")))
        if settings.n_val > len(source):
            raise ValueError(f"gsm8k: n_val={settings.n_val} exceeds the {len(source)} held-out train problems")
        return [
            validation_row(example_id(NAME, "train", r["question"]), NAME, *validation_example(r["question"], r["answer"]))
            for r in seeded_subset(source, settings.n_val, seed)
        ]

    def test_examples(self, files, settings: TaskSettings, seed: int) -> tuple[list[dict], dict]:
        rows = read_gsm8k(single_file(files, "test"))
        chosen = seeded_subset(rows, settings.max_per_subtask, seed)
        return [test_row(example_id(NAME, "test", r["question"]), NAME, r["question"], r["gold"], answer=r["answer"]) for r in chosen], {}

    def decontamination_texts(self, files) -> list[str]:
        held = held_out(read_gsm8k(single_file(files, "train")))
        return [r["question"] for r in held] + [r["question"] for r in read_gsm8k(single_file(files, "test"))]

    def evaluate(self, lm, examples: list[dict], shared: dict, settings: TaskSettings) -> tuple[dict, list[dict]]:
        """Greedy n-shot CoT, cut at the first blank line; exact match of the last number (exemplars dropped to fit the context)."""
        fitted = [
            fit_shots(
                lambda k, q=e["question"]: lm.chat.prompt(fewshot_user(q, k), "Answer:"),
                settings.n_shot,
                lambda p: lm.fits(p, settings.max_new_tokens),
                e["example_id"],
            )
            for e in examples
        ]
        outputs = lm.greedy([p for p, _ in fitted], settings.max_new_tokens, [STOP], desc=NAME)
        records = []
        for example, output, (_, shots) in zip(examples, outputs, fitted):
            predicted = extract_prediction(output)
            records.append(prediction(example, shots, output, predicted, is_correct(predicted, example["reference"])))
        metrics = {
            "exact_match": sum(r["score"] for r in records) / len(records),
            "n_examples": len(records),
            "n_prompts_with_fewer_shots": sum(1 for _, shots in fitted if shots < settings.n_shot),
        }
        return metrics, records

    def loss_example(self, example: dict) -> tuple[str, str, str]:
        return validation_example(example["question"], fields_of(example)["answer"])


TASK = Gsm8k()
