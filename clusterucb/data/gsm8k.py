"""GSM8K as the target task: validation set for gradient matching, test set for evaluation.

The validation set is drawn from the GSM8K *train* split (the official
ClusterUCB code samples it from the test set, which leaks the evaluation
set into selection; spec §10.8). Evaluation uses the *test* split.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from clusterucb.data.sources import DataError, iter_records

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
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
        "Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
        "So the answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
        "now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9. So the answer is 9.",
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
    return rows


def gold_answer(answer: str) -> str:
    """The number after '####' in a GSM8K answer, without thousands separators."""
    return answer.split("####")[-1].strip().replace(",", "")


def target_id(split: str, question: str) -> str:
    return f"gsm8k_{split}-{hashlib.sha256(question.encode()).hexdigest()[:16]}"


def sample_rows(rows: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` rows drawn without replacement with a seeded generator, in file order."""
    if n > len(rows):
        raise ValueError(f"asked for {n} examples but the split has only {len(rows)}")
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[i] for i in chosen]


def validation_example(row: dict[str, str]) -> tuple[str, str]:
    """Prompt and completion for validation gradients (spec §1.3, GSM, tulu format).

    The completion is the raw GSM8K answer, <<calc>> annotations and '#### N' included.
    """
    prompt = "<|user|>\nAnswer the following question.\n\nQuestion: " + row["question"] + "\n<|assistant|>\nAnswer: \n\n"
    return prompt, row["answer"]


def fewshot_prompt(question: str, n_shot: int) -> str:
    """n-shot CoT evaluation prompt in tulu chat format, ending with 'Answer:' (spec §8)."""
    if not 0 <= n_shot <= len(COT_EXEMPLARS):
        raise ValueError(f"n_shot must be in [0, {len(COT_EXEMPLARS)}], got {n_shot}")
    demos = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in COT_EXEMPLARS[:n_shot])
    body = "Answer the following questions.\n\n"
    if demos:
        body += demos + "\n\n"
    body += "Question: " + question
    return "<|user|>\n" + body + "\n<|assistant|>\nAnswer:"


def extract_prediction(output: str) -> str | None:
    """The last number in a model output, commas stripped (open-instruct GSM metric)."""
    numbers = _NUMBER.findall(output.replace(",", ""))
    if not numbers:
        return None
    value = numbers[-1]
    return value.rstrip(".") if value.endswith(".") else value


def is_correct(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    try:
        return float(prediction) == float(gold)
    except ValueError:
        return prediction == gold
