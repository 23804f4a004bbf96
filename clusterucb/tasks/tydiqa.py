"""TyDiQA GoldP: extractive QA in nine languages, 1-shot, SQuAD F1/EM per language (spec §1.3, §8).

Validation: LESS's builder on ``tydiqa-one-shot.json``, one example per language
in that language's prompt template. Evaluation: open-instruct's GoldP protocol on
the official dev set: the language's instruction, one demonstration (the same
one-shot examples, drawn by open-instruct from the train split), the passage cut
to ``max_context_tokens`` tokens and the question; greedy, at most 50 new tokens;
SQuAD v1.1 F1 and exact match per language, averaged over languages. The one-shot
examples are checked against the dev set (id, question and passage): any dev
example that is one of them is left out and counted (none are, on the staged data).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter

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

NAME = "tydiqa"

# (instruction, passage, question, answer) per language: open-instruct's encoding_templates_with_context.
TEMPLATES = {
    "english": ("Answer the following question based on the information in the given passage.", "Passage:", "Question:", "Answer:"),
    "arabic": ("أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.", "المقطع:", "السؤال:", "الإجابة:"),
    "bengali": ("প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।", "অধ্যায়:", "প্রশ্ন:", "উত্তর:"),
    "finnish": ("Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.", "Kappale:", "Kysymys:", "Vastaus:"),
    "indonesian": ("Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.", "Bagian:", "Pertanyaan:", "Jawaban:"),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "문단:", "질문:", "답변:"),
    "russian": ("Ответьте на следующий вопрос на основе информации в данном отрывке.", "Отрывок:", "Вопрос:", "Ответ:"),
    "swahili": ("Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.", "Kifungu:", "Swali:", "Jibu:"),
    "telugu": ("ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.", "పేరా:", "ప్రశ్న:", "సమాధానం:"),
}


# ---------------------------------------------------------------- SQuAD v1.1 metric (official evaluation script)


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation and the English articles, collapse white space (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction_: str, truth: str) -> float:
    predicted, gold = normalize_answer(prediction_).split(), normalize_answer(truth).split()
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction_: str, truth: str) -> float:
    return float(normalize_answer(prediction_) == normalize_answer(truth))


def best_over_answers(metric, prediction_: str, answers: list[str]) -> float:
    return max(metric(prediction_, a) for a in answers)


# ---------------------------------------------------------------- data


def language_of(question_id: str) -> str:
    language = question_id.split("-", 1)[0]
    if language not in TEMPLATES:
        raise DataError(f"tydiqa: question id {question_id!r} does not start with a known language")
    return language


def read_dev(path) -> list[dict]:
    """Every question of a GoldP (SQuAD-layout) file: id, language, passage, question, answer texts."""
    document = read_json(path)
    if not isinstance(document, dict) or "data" not in document:
        raise DataError(f"{path}: expected a SQuAD-layout JSON object with 'data'")
    out = []
    for article in document["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                if not answers:
                    raise DataError(f"{path}: question {qa['id']} has no answer")
                out.append(
                    {
                        "id": qa["id"],
                        "lang": language_of(qa["id"]),
                        "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": answers,
                    }
                )
    if not out:
        raise DataError(f"{path}: 0 questions read")
    return out


def read_one_shot(path) -> dict[str, list[dict]]:
    record = read_json(path)
    if not isinstance(record, dict) or set(record) - set(TEMPLATES):
        raise DataError(f"{path}: expected an object language -> examples, languages {sorted(TEMPLATES)}")
    return {
        lang: [
            {"id": e["id"], "context": e["context"], "question": e["question"], "answers": [a["text"] for a in e["answers"]]}
            for e in examples
        ]
        for lang, examples in record.items()
    }


def passage_question(lang: str, context: str, question: str) -> str:
    _, p_template, q_template, _ = TEMPLATES[lang]
    return p_template + " " + context + "\n" + q_template + " " + question


def demonstration(lang: str, example: dict) -> str:
    return passage_question(lang, example["context"], example["question"]) + "\n" + TEMPLATES[lang][3] + " " + example["answers"][0]


def eval_user(lang: str, demos: list[dict], context: str, question: str) -> str:
    """open-instruct's GoldP prompt: instruction, blank line, demonstrations, passage and question."""
    text = TEMPLATES[lang][0] + "\n\n"
    if demos:
        text += "\n\n".join(demonstration(lang, d) for d in demos) + "\n\n"
    return text + passage_question(lang, context, question) + "\n"


class TyDiQA:
    name = NAME
    metric = "f1"
    defaults = TaskSettings(n_val=1, max_per_subtask=None, n_shot=1, max_new_tokens=50, max_context_tokens=512)
    settings_used = frozenset({"n_val", "max_per_subtask", "n_shot", "max_new_tokens", "max_context_tokens"})
    validation_settings = frozenset({"n_val"})
    test_settings = frozenset({"max_per_subtask"})

    def data_files(self) -> dict[str, str]:
        return {"dev": "tydiqa/tydiqa-goldp-v1.1-dev.json.gz", "one_shot": "tydiqa/tydiqa-one-shot.json"}

    def validation_examples(self, files, settings: TaskSettings, seed: int) -> list[dict]:
        rows = []
        for lang, examples in read_one_shot(single_file(files, "one_shot")).items():  # file order, as LESS
            if settings.n_val > len(examples):
                raise ValueError(f"tydiqa: n_val={settings.n_val} exceeds the {len(examples)} one-shot examples of {lang}")
            for e in examples[: settings.n_val]:
                # LESS puts no separator between the instruction and the passage label.
                user = TEMPLATES[lang][0] + passage_question(lang, e["context"], e["question"])
                rows.append(validation_row(example_id(NAME, "one_shot", e["id"]), lang, user, TEMPLATES[lang][3], " " + e["answers"][0]))
        return rows

    def test_examples(self, files, settings: TaskSettings, seed: int) -> tuple[list[dict], dict]:
        """Dev questions per language (capped), minus any that is a one-shot example; the demonstrations in ``shared``."""
        one_shot = read_one_shot(single_file(files, "one_shot"))
        shots = [e for examples in one_shot.values() for e in examples]
        seen = {e["id"] for e in shots} | {e["question"].strip() for e in shots} | {e["context"] for e in shots}
        dev = read_dev(single_file(files, "dev"))
        overlap = [d["id"] for d in dev if d["id"] in seen or d["question"].strip() in seen or d["context"] in seen]
        rows = [
            test_row(
                example_id(NAME, "dev", d["id"]),
                d["lang"],
                d["question"],
                d["answers"][0],
                id=d["id"],
                context=d["context"],
                answers=d["answers"],
            )
            for d in sorted((d for d in dev if d["id"] not in overlap), key=lambda d: d["lang"])
        ]
        return per_subtask_subset(rows, settings.max_per_subtask, seed), {"one_shot": one_shot, "excluded_one_shot_overlap": overlap}

    def decontamination_texts(self, files) -> list[str]:
        one_shot = read_one_shot(single_file(files, "one_shot"))
        return [d["question"] for d in read_dev(single_file(files, "dev"))] + [e["question"] for es in one_shot.values() for e in es]

    def evaluate(self, lm, examples: list[dict], shared: dict, settings: TaskSettings) -> tuple[dict, list[dict]]:
        demos = {
            lang: [{**e, "context": lm.truncate(e["context"], settings.max_context_tokens)} for e in examples_[: settings.n_shot]]
            for lang, examples_ in shared["one_shot"].items()
        }

        def render(example, shots):
            lang = example["subtask"]
            context = lm.truncate(fields_of(example)["context"], settings.max_context_tokens)
            return lm.chat.prompt(eval_user(lang, demos[lang][:shots], context, example["question"]), TEMPLATES[lang][3])

        fitted = [
            fit_shots(lambda k, e=e: render(e, k), settings.n_shot, lambda p: lm.fits(p, settings.max_new_tokens), e["example_id"])
            for e in examples
        ]
        outputs = lm.greedy([p for p, _ in fitted], settings.max_new_tokens, desc=NAME)
        records = []
        for example, output, (_, shots) in zip(examples, outputs, fitted):
            answer = output.strip()
            answers = fields_of(example)["answers"]
            f1 = best_over_answers(f1_score, answer, answers)
            records.append(
                prediction(example, shots, output, answer, f1, exact_match=best_over_answers(exact_match_score, answer, answers))
            )
        per_language: dict[str, list[tuple[float, float]]] = {}
        for record in records:
            per_language.setdefault(record["subtask"], []).append((record["score"], json.loads(record["details"])["exact_match"]))
        f1 = {lang: sum(f for f, _ in v) / len(v) for lang, v in sorted(per_language.items())}
        em = {lang: sum(e for _, e in v) / len(v) for lang, v in sorted(per_language.items())}
        metrics = {
            "f1": sum(f1.values()) / len(f1),  # mean over languages, as open-instruct's average f1
            "exact_match": sum(em.values()) / len(em),
            "per_language_f1": f1,
            "per_language_exact_match": em,
            "n_examples": len(records),
            "n_prompts_with_fewer_shots": sum(1 for _, shots in fitted if shots < settings.n_shot),
            "excluded_one_shot_overlap": shared.get("excluded_one_shot_overlap", []),
        }
        return metrics, records

    def loss_example(self, example: dict) -> tuple[str, str, str]:
        lang = example["subtask"]
        user = TEMPLATES[lang][0] + passage_question(lang, fields_of(example)["context"], example["question"])
        return user, TEMPLATES[lang][3], " " + example["reference"]


TASK = TyDiQA()
