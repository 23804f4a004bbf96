"""Target tasks on the staged data: validation sets as the method spec builds them, test sets, decontamination
texts, and golden tests of every evaluation (gold answers score 1, wrong ones 0) with a scripted language model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from clusterucb.data.chat import ChatFormat
from clusterucb.data.sources import DataError
from clusterucb.tasks import get_task, resolve_settings, task_names
from clusterucb.tasks.base import Sampling, fields_of, pass_at_k, per_subtask_subset, seeded_subset

REPO = Path(__file__).resolve().parents[2]


class ScriptedLM:
    """The LanguageModel interface with answers chosen by ``answer(prompt)``; context measured in characters / 4."""

    def __init__(self, answer, context_tokens: int = 10**7):
        self.chat = ChatFormat("tulu", tokenizer=None)
        self.answer = answer
        self.context_tokens = context_tokens
        self.seed, self.workers = 0, 2
        self.prompts: list[str] = []

    def n_tokens(self, prompt: str) -> int:
        return len(prompt) // 4

    def fits(self, prompt: str, new_tokens: int) -> bool:
        return self.n_tokens(prompt) + new_tokens <= self.context_tokens

    def greedy(self, prompts, max_new_tokens, stops=(), desc=""):
        self.prompts += list(prompts)
        return [self.answer(p) for p in prompts]

    def sample(self, prompt, n, temperature, top_p, max_new_tokens, stops, seed):
        self.prompts.append(prompt)
        return [self.answer(prompt)] * n

    def last_token_id(self, text):
        return " ABCD".index(text.strip())

    def next_token_logits(self, prompts, candidate_ids):
        import torch

        self.prompts += list(prompts)
        out = torch.zeros(len(prompts), len(candidate_ids))
        for row, prompt in enumerate(prompts):
            out[row, candidate_ids.index(" ABCD".index(self.answer(prompt)))] = 1.0
        return out


def last_example(examples, prompt):
    """The test example whose question occurs last in ``prompt`` (the one being asked)."""
    return max(examples, key=lambda e: prompt.rfind(e["question"]))


def files_of(datasets: Path, task) -> dict[str, list[Path]]:
    return {role: sorted(datasets.glob(pattern)) for role, pattern in task.data_files().items()}


@pytest.fixture(scope="module")
def staged(datasets):
    return {name: files_of(datasets, get_task(name)) for name in task_names()}


def settings(name, **overrides):
    return resolve_settings(get_task(name), overrides)


# ---------------------------------------------------------------- registry and settings


# Another value for each setting, as a task's evaluation might change it.
OTHER_VALUES = {
    "n_val": 2,
    "max_per_subtask": 1,
    "n_shot": 1,
    "max_new_tokens": 7,
    "max_context_tokens": 32,
    "sampling": "greedy",
    "timeout_s": 1.0,
}


@pytest.mark.parametrize("name", task_names())
def test_validation_and_test_sets_read_only_their_declared_settings(staged, name):
    """The rules pass prepare_validation / prepare_test only these settings, so this is what keeps an
    evaluation knob from rebuilding the validation set (and every gradient after it)."""
    task = get_task(name)
    assert task.validation_settings | task.test_settings <= task.settings_used
    base = settings(name, max_per_subtask=2)
    for which, declared, build in (
        ("validation", task.validation_settings, lambda s: task.validation_examples(staged[name], s, 0)),
        ("test", task.test_settings, lambda s: task.test_examples(staged[name], s, 0)),
    ):
        reference = build(base)
        for key in sorted(task.settings_used - declared):
            changed = resolve_settings(
                task, {**{k: v for k, v in base.as_dict().items() if k in task.settings_used}, key: OTHER_VALUES[key]}
            )
            assert build(changed) == reference, f"{name}: the {which} set depends on {key!r}, which it does not declare"


def test_registry_matches_the_schema_enum():
    schema = yaml.safe_load((REPO / "config.schema.yaml").read_text())
    assert task_names() == ("bbh", "gsm8k", "humaneval", "mmlu", "tydiqa")
    assert schema["$defs"]["task"]["enum"] == list(task_names())
    for name in task_names():
        task = get_task(name)
        assert task.name == name and task.settings_used
    with pytest.raises(ValueError, match="unknown target task 'squad'"):
        get_task("squad")


def test_settings_resolve_defaults_and_refuse_what_a_task_does_not_use():
    assert settings("gsm8k").n_shot == 8 and settings("mmlu").n_shot == 5 and settings("tydiqa").max_context_tokens == 512
    assert settings("humaneval").sampling == (Sampling(20, 0.1, 0.95, (1,)), Sampling(20, 0.8, 0.95, (10,)))
    assert settings("gsm8k", n_shot=4, max_per_subtask=None).n_shot == 4
    with pytest.raises(ValueError, match=r"'mmlu' does not use \['max_new_tokens'\]"):
        settings("mmlu", max_new_tokens=10)
    with pytest.raises(ValueError, match="unknown setting"):
        settings("gsm8k", nshot=3)
    with pytest.raises(ValueError, match="one sampling pass"):
        settings("humaneval", sampling=[{"n": 5, "temperature": 0.2, "k": [1]}, {"n": 5, "temperature": 0.8, "k": [1, 5]}])
    with pytest.raises(ValueError, match="1 <= k <= n"):
        settings("humaneval", sampling=[{"n": 5, "temperature": 0.2, "k": [10]}])
    assert settings("humaneval", sampling="greedy").sampling == "greedy"


def test_seeded_subsets_are_deterministic_in_file_order_and_per_subtask():
    rows = [{"subtask": s, "i": i} for s in ("a", "b") for i in range(10)]
    one = per_subtask_subset(rows, 3, seed=5)
    assert one == per_subtask_subset(rows, 3, seed=5) != per_subtask_subset(rows, 3, seed=6)
    assert [r["subtask"] for r in one] == ["a"] * 3 + ["b"] * 3
    assert [r["i"] for r in one[:3]] == sorted(r["i"] for r in one[:3])
    assert seeded_subset(rows, None, 0) == rows and seeded_subset(rows, 100, 0) == rows


def test_pass_at_k_matches_the_closed_form():
    for n, c, k in [(20, 0, 1), (20, 3, 1), (20, 3, 10), (20, 17, 10), (20, 20, 10), (5, 2, 5), (1, 1, 1)]:
        expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(20, 3, 1) == pytest.approx(3 / 20)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_validation_from_a_fixed_held_out_train_part(staged):
    from clusterucb.tasks import gsm8k

    task = get_task("gsm8k")
    val = task.validation_examples(staged["gsm8k"], settings("gsm8k", n_val=50), seed=7)
    assert len(val) == 50 and {r["subtask"] for r in val} == {"gsm8k"}
    train = gsm8k.read_gsm8k(staged["gsm8k"]["train"][0])
    held = {r["question"] for r in gsm8k.held_out(train)}
    assert len(held) == gsm8k.VAL_POOL
    first = val[0]
    question = first["user"].removeprefix("Answer the following question.\n\nQuestion: ")
    assert question in held
    assert first["assistant_prefix"] == "Answer: \n\n" and "####" in first["completion"]
    # n_val only draws more or fewer from the same held-out part: the decontamination texts do not move.
    texts = task.decontamination_texts(staged["gsm8k"])
    assert set(texts) >= held and len(texts) == gsm8k.VAL_POOL + 1319
    small = task.validation_examples(staged["gsm8k"], settings("gsm8k", n_val=10), seed=7)
    assert {r["user"] for r in small} <= {"Answer the following question.\n\nQuestion: " + q for q in held}


def test_gsm8k_rendering_matches_the_spec(staged):
    task = get_task("gsm8k")
    (row,) = task.validation_examples(staged["gsm8k"], settings("gsm8k", n_val=1), seed=0)
    chat = ChatFormat("tulu", None)
    prompt = chat.prompt(row["user"], row["assistant_prefix"])
    assert prompt.startswith("<|user|>\nAnswer the following question.\n\nQuestion: ")
    assert prompt.endswith("\n<|assistant|>\nAnswer: \n\n")


def test_gsm8k_fewshot_prompt():
    from clusterucb.tasks.gsm8k import COT_EXEMPLARS, fewshot_user

    question = "Janet has 3 ducks. How many ducks?"
    prompt = ChatFormat("tulu", None).prompt(fewshot_user(question, 8), "Answer:")
    assert prompt.startswith("<|user|>\nAnswer the following questions.\n\nQuestion: ")
    assert prompt.count("Question:") == 9 and prompt.count("\nAnswer: ") == 8
    for q, a in COT_EXEMPLARS:
        assert f"Question: {q}\nAnswer: {a}\n\n" in prompt
    assert prompt.endswith("Question: " + question + "\n<|assistant|>\nAnswer:")
    assert fewshot_user(question, 0) == "Answer the following questions.\n\nQuestion: " + question
    with pytest.raises(ValueError):
        fewshot_user(question, 9)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("We have 3 boxes of 4, so 1,234 apples. The answer is 1,234.", "1234"),
        ("So the answer is 72.", "72"),
        ("It costs $3.50 in total", "3.50"),
        ("The temperature drops to -5 degrees.", "-5"),
        ("18 then 20 then 1,000,000", "1000000"),
        ("no number here", None),
        ("", None),
    ],
)
def test_gsm8k_extract_prediction(output, expected):
    from clusterucb.tasks.gsm8k import extract_prediction

    assert extract_prediction(output) == expected


def test_gsm8k_read_errors_name_file_and_row(tmp_path):
    from clusterucb.tasks.gsm8k import gold_answer, is_correct, read_gsm8k

    path = tmp_path / "g.jsonl"
    path.write_text(
        json.dumps({"question": "q?", "answer": "#### 1,234"}) + "\n" + json.dumps({"question": "q2", "answer": "no marker"}) + "\n"
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: row 2"):
        read_gsm8k(path)
    path.write_text("")
    with pytest.raises(DataError, match="0 rows read"):
        read_gsm8k(path)
    assert is_correct("72.0", "72") and is_correct("1234", gold_answer("... #### 1,234")) and not is_correct(None, "72")


def test_gsm8k_golden(staged):
    task = get_task("gsm8k")
    examples, shared = task.test_examples(staged["gsm8k"], settings("gsm8k", max_per_subtask=25), seed=3)
    assert len(examples) == 25
    gold = ScriptedLM(lambda p: f"Lots of reasoning, 1 + 1 = 2. So the answer is {float(last_example(examples, p)['reference']):,}.")
    metrics, records = task.evaluate(gold, examples, shared, settings("gsm8k"))
    assert metrics["exact_match"] == 1.0 and all(r["score"] == 1.0 for r in records)
    wrong = ScriptedLM(lambda p: f"So the answer is {float(last_example(examples, p)['reference']) + 1}.")
    assert task.evaluate(wrong, examples, shared, settings("gsm8k"))[0]["exact_match"] == 0.0
    # Exemplars are dropped while the prompt does not fit the context.
    short = ScriptedLM(gold.answer, context_tokens=700)
    metrics, records = task.evaluate(short, examples[:3], shared, settings("gsm8k", max_new_tokens=100))
    assert metrics["n_prompts_with_fewer_shots"] == 3 and all(r["n_shot"] < 8 for r in records)


# ---------------------------------------------------------------- MMLU


def test_mmlu_validation_is_57_subjects_times_5_dev_rows_zero_shot(staged):
    task = get_task("mmlu")
    val = task.validation_examples(staged["mmlu"], settings("mmlu"), seed=0)
    assert len(val) == 285
    subjects = [r["subtask"] for r in val]
    assert subjects == sorted(subjects) and len(set(subjects)) == 57  # subject-contiguous, sorted
    first = val[0]
    assert first["subtask"] == "abstract_algebra"
    prompt = ChatFormat("tulu", None).prompt(first["user"], first["assistant_prefix"])
    assert prompt == (
        "<|user|>\nThe following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:"
        "\n<|assistant|>\nThe answer is:"
    )
    assert first["completion"] == " B"


def test_mmlu_golden_and_shot_reduction(staged):
    task = get_task("mmlu")
    examples, shared = task.test_examples(staged["mmlu"], settings("mmlu", max_per_subtask=2), seed=0)
    assert len(examples) == 114 and len(shared["dev"]) == 57
    right = ScriptedLM(lambda p: last_example(examples, p)["reference"])
    metrics, records = task.evaluate(right, examples, shared, settings("mmlu"))
    assert metrics["accuracy"] == 1.0 and metrics["accuracy_macro"] == 1.0 and len(metrics["per_subject"]) == 57
    # Shots are dropped only while the prompt is over open-instruct's 2048 tokens (here: characters / 4).
    assert sum(r["n_shot"] == 5 for r in records) > 100 and metrics["n_prompts_with_fewer_shots"] == sum(r["n_shot"] < 5 for r in records)
    # The 5-shot prompt: header, five answered dev rows, then the question without its answer.
    prompt = right.prompts[0]
    assert prompt.count("\nAnswer: ") == 5 and prompt.endswith("\nAnswer:\n<|assistant|>\nThe answer is:")
    wrong = ScriptedLM(lambda p: "ABCD"[("ABCD".index(last_example(examples, p)["reference"]) + 1) % 4])
    assert task.evaluate(wrong, examples, shared, settings("mmlu"))[0]["accuracy"] == 0.0
    zero = task.evaluate(ScriptedLM(right.answer), examples, shared, settings("mmlu", n_shot=0))[1]
    assert {r["n_shot"] for r in zero} == {0}
    tight = task.evaluate(ScriptedLM(right.answer, context_tokens=1500), examples, shared, settings("mmlu"))[0]
    assert tight["n_prompts_with_fewer_shots"] > 0 and tight["accuracy"] == 1.0


# ---------------------------------------------------------------- BBH


def test_bbh_validation_is_27_tasks_times_3_exemplars(staged):
    from clusterucb.tasks.bbh import split_exemplar

    task = get_task("bbh")
    val = task.validation_examples(staged["bbh"], settings("bbh"), seed=0)
    assert len(val) == 81 and len({r["subtask"] for r in val}) == 27
    three_shot = json.loads(staged["bbh"]["three_shot"][0].read_text())
    name = next(iter(three_shot))
    fields_ = three_shot[name].split("\n\n")
    description, exemplars = "\n\n".join(fields_[:-3]), fields_[-3:]
    second = [r for r in val if r["subtask"] == name][1]
    q0, a0 = split_exemplar(exemplars[0])
    q1, a1 = split_exemplar(exemplars[1])
    q2, a2 = split_exemplar(exemplars[2])
    assert second["user"] == description.strip() + "\n\n" + q0 + "\nA:" + a0 + "\n\n" + q2 + "\nA:" + a2 + "\n\n" + q1
    assert second["assistant_prefix"] == "A:" and second["completion"] == a1


def test_bbh_cot_prompts_parse_back_exactly(staged):
    from clusterucb.tasks.bbh import parse_cot_prompt, read_cot_prompt, task_prompt

    for path in staged["bbh"]["cot_prompts"]:
        text = read_cot_prompt(path)
        assert not text.startswith("BENCHMARK DATA") and not text.startswith("-----")
        description, exemplars = parse_cot_prompt(text)
        assert len(exemplars) == 3, path.name
        assert task_prompt(description, exemplars, 3).strip() == text.strip()


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Let's think step by step. So the answer is (B).", "(B)"),
        ("the answer is True. Then more text.", "True"),
        ("So The answer is 3.5.", "3"),  # the official non-greedy regex stops at the first period
        ("no marker at all  ", "no marker at all"),
        ("A|he answer is yes.", "yes"),  # the official character class [t|T] also takes '|'
    ],
)
def test_bbh_answer_extraction(output, expected):
    from clusterucb.tasks.bbh import extract_answer

    assert extract_answer(output) == expected


def test_bbh_exact_match_ignores_case_and_punctuation_only():
    from clusterucb.tasks.bbh import exact_match

    assert exact_match("(a)", "(A)") and exact_match("True", "true.") and exact_match("valid", "Valid")
    assert not exact_match(" valid", "valid")  # whitespace is not stripped (HF exact_match)
    assert not exact_match("(B)", "(A)")


def test_bbh_golden(staged):
    task = get_task("bbh")
    examples, shared = task.test_examples(staged["bbh"], settings("bbh", max_per_subtask=2), seed=0)
    assert len(examples) == 54 and len(shared["cot_prompts"]) == 27
    gold = ScriptedLM(lambda p: f"Let's think step by step. Yes. So the answer is {last_example(examples, p)['reference']}.")
    metrics, records = task.evaluate(gold, examples, shared, settings("bbh"))
    wrong_refs = [r for r in records if r["score"] != 1.0]
    # A reference that itself contains a period cannot survive the official regex (e.g. dyck closings never do).
    assert all("." in r["reference"] for r in wrong_refs), wrong_refs[:3]
    assert metrics["exact_match"] > 0.9 and len(metrics["per_task"]) == 27
    prompt = gold.prompts[0]
    assert prompt.startswith("<|user|>\n") and "\n\nQ: " in prompt and prompt.endswith("\n<|assistant|>\nA:")
    wrong = ScriptedLM(lambda p: "So the answer is (Z) nothing.")
    assert task.evaluate(wrong, examples, shared, settings("bbh"))[0]["exact_match"] == 0.0


# ---------------------------------------------------------------- HumanEval


def test_humaneval_validation_is_the_official_draw_and_left_out_of_the_test_set(staged):
    import random

    from clusterucb.tasks.humaneval import ANSWER_START, read_problems

    task = get_task("humaneval")
    problems = read_problems(staged["humaneval"]["problems"][0], staged["humaneval"]["pack"][0])
    expected = random.Random(42).sample(problems, 10)
    # The official draw (random.seed(42); random.sample(items, 10) over HumanEval's file order).
    assert [p["task_id"] for p in expected] == [f"HumanEval/{i}" for i in (163, 28, 6, 70, 62, 57, 35, 26, 139, 22)]
    val = task.validation_examples(staged["humaneval"], settings("humaneval"), seed=123)  # the run's seed does not matter
    assert [r["user"] for r in val] == [p["instruction"] for p in expected]
    assert val[0]["assistant_prefix"] == ANSWER_START + expected[0]["prompt"]
    assert val[0]["completion"] == expected[0]["canonical_solution"] + "\n```"
    examples, shared = task.test_examples(staged["humaneval"], settings("humaneval"), seed=0)
    held = {p["task_id"] for p in expected}
    assert len(examples) == 154 and not held & {fields_of(e)["task_id"] for e in examples}
    assert sorted(shared["excluded_validation_problems"]) == sorted(held)
    assert len(task.decontamination_texts(staged["humaneval"])) == 164


def test_humaneval_golden_canonical_solutions_pass_and_broken_ones_fail(staged):
    task = get_task("humaneval")
    examples, shared = task.test_examples(staged["humaneval"], settings("humaneval"), seed=0)
    canonical = ScriptedLM(lambda p: last_example(examples, p)["reference"])
    metrics, records = task.evaluate(canonical, examples, shared, settings("humaneval", sampling="greedy"))
    failed = [fields_of(e)["task_id"] for e, r in zip(examples, records) if r["score"] != 1.0]
    assert metrics["pass@1"] == 1.0, failed
    assert metrics["programs_run"] == 154 and metrics["sandbox"]["mode"]
    broken = ScriptedLM(lambda p: "    return None\n")
    subset = examples[:30]
    assert task.evaluate(broken, subset, shared, settings("humaneval", sampling="greedy"))[0]["pass@1"] == 0.0
    # Sampled passes: n samples per problem, pass@k per pass.
    sampled = task.evaluate(
        ScriptedLM(canonical.answer),
        subset[:5],
        shared,
        settings("humaneval", sampling=[{"n": 3, "temperature": 0.2, "k": [1]}, {"n": 3, "temperature": 0.8, "k": [2]}]),
    )[0]
    assert sampled["pass@1"] == 1.0 and sampled["pass@2"] == 1.0 and sampled["programs_run"] == 30


# ---------------------------------------------------------------- TyDiQA


def test_tydiqa_validation_is_less_one_shot_format(staged):
    from clusterucb.tasks.tydiqa import TEMPLATES

    task = get_task("tydiqa")
    val = task.validation_examples(staged["tydiqa"], settings("tydiqa"), seed=0)
    assert len(val) == 9 and len({r["subtask"] for r in val}) == 9
    one_shot = json.loads(staged["tydiqa"]["one_shot"][0].read_text())
    english = next(r for r in val if r["subtask"] == "english")
    example = one_shot["english"][0]
    prompt = ChatFormat("tulu", None).prompt(english["user"], english["assistant_prefix"])
    # LESS: no separator between the instruction and "Passage:", one newline before <|assistant|>.
    assert prompt == (
        "<|user|>\n"
        + TEMPLATES["english"][0]
        + "Passage: "
        + example["context"]
        + "\nQuestion: "
        + example["question"]
        + "\n<|assistant|>\nAnswer:"
    )
    assert english["completion"] == " " + example["answers"][0]["text"]


def test_tydiqa_one_shot_examples_are_not_in_the_dev_set(staged):
    task = get_task("tydiqa")
    examples, shared = task.test_examples(staged["tydiqa"], settings("tydiqa"), seed=0)
    assert shared["excluded_one_shot_overlap"] == [] and len(examples) == 5077
    assert [r["subtask"] for r in examples] == sorted(r["subtask"] for r in examples)  # language-contiguous


@pytest.mark.parametrize(
    ("prediction", "answers", "f1", "em"),
    [
        ("Home Box Office", ["Home Box Office"], 1.0, 1.0),
        ("the Home Box Office!", ["Home Box Office"], 1.0, 1.0),  # articles and punctuation dropped
        ("Box Office Inc", ["Home Box Office"], 2 * (2 / 3) * (2 / 3) / (4 / 3), 0.0),
        ("Helsingissä vuonna 1952", ["Helsingissä", "vuonna 1952"], 0.8, 0.0),  # best over the gold answers
        ("Москва, Россия", ["Москва"], 2 * 0.5 * 1.0 / 1.5, 0.0),  # non-English tokens, ASCII punctuation dropped
        ("", ["x"], 0.0, 0.0),
    ],
)
def test_squad_f1_and_exact_match(prediction, answers, f1, em):
    from clusterucb.tasks.tydiqa import best_over_answers, exact_match_score, f1_score

    assert best_over_answers(f1_score, prediction, answers) == pytest.approx(f1)
    assert best_over_answers(exact_match_score, prediction, answers) == em


def test_tydiqa_golden_and_prompt(staged):
    task = get_task("tydiqa")
    examples, shared = task.test_examples(staged["tydiqa"], settings("tydiqa", max_per_subtask=3), seed=0)
    assert len(examples) == 27

    class Truncating(ScriptedLM):
        def truncate(self, text, max_tokens):
            return text[: 4 * max_tokens]

    gold = Truncating(lambda p: " " + last_example(examples, p)["reference"] + " ")
    metrics, records = task.evaluate(gold, examples, shared, settings("tydiqa"))
    assert metrics["f1"] == 1.0 and metrics["exact_match"] == 1.0 and len(metrics["per_language_f1"]) == 9
    prompt = gold.prompts[0]
    assert prompt.startswith("<|user|>\n") and "\n\n" in prompt.split("<|user|>\n", 1)[1][:300]
    assert re.search(r"\n\n<\|assistant\|>\n\S+:$", prompt), prompt[-80:]  # open-instruct: a blank line before the answer
    assert all(r["n_shot"] == 1 for r in records)
    wrong = Truncating(lambda p: "zzzz")
    assert task.evaluate(wrong, examples, shared, settings("tydiqa"))[0]["f1"] == 0.0
