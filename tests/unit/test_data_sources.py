"""Unit tests of clusterucb.data.sources: the staged sources of the demo (configs/demo.yaml) and malformed-row handling."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import yaml

from clusterucb.data.sources import (
    CONVERTERS,
    DataError,
    ReadStats,
    expand_files,
    iter_records,
    read_source,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
CONFIG_SOURCES: dict[str, dict] = CONFIG["data"]["sources"]

# Malformed rows known to be in the staged data (rows whose answer is empty).
KNOWN_MALFORMED = {"alpaca": 4, "code_alpaca": 2, "t0": 600}
T0_EMPTY_TEMPLATES = {
    "trec_fine_grained_open.jsonl.gz",
    "trec_trec1.jsonl.gz",
    "trec_which_category_best_describes.jsonl.gz",
}
ORIGIN = re.compile(r"^(?P<file>[^:/]+):(?P<row>\d+)(?:\.(?P<index>\d+))?$")


_CACHE: dict[str, tuple[list, ReadStats]] = {}


def _read_config_source(datasets: Path, name: str):
    """Read one configured source once per test session (on_malformed='skip')."""
    if name not in _CACHE:
        spec = CONFIG_SOURCES[name]
        stats = ReadStats()
        examples = list(read_source([datasets / f for f in spec["files"]], spec["format"], "skip", stats))
        _CACHE[name] = (examples, stats)
    return _CACHE[name]


def _assert_conversation(messages: list[dict[str, str]]) -> None:
    assert messages, "empty conversation"
    assert len(messages) % 2 == 0, [m["role"] for m in messages]
    for i, message in enumerate(messages):
        assert set(message) == {"role", "content"}
        assert message["role"] == ("user" if i % 2 == 0 else "assistant"), [m["role"] for m in messages]
        assert isinstance(message["content"], str) and message["content"].strip(), f"message {i} is empty"
    assert messages[-1]["role"] == "assistant"


# ---------------------------------------------------------------------------------------------
# The real staged sources of the demo (configs/demo.yaml)
# ---------------------------------------------------------------------------------------------


def test_config_uses_the_expected_formats():
    formats = {spec["format"] for spec in CONFIG_SOURCES.values()}
    assert formats == {"alpaca", "self_instruct", "prompt_completion", "flan_cot", "gsm8k"}
    assert formats <= set(CONVERTERS)
    assert CONFIG_SOURCES["t0"]["files"] == ["t0_train_50k/*.jsonl.gz"]


@pytest.mark.parametrize("name", list(CONFIG_SOURCES))
def test_real_source_reads_clean_conversations(datasets, name):
    spec = CONFIG_SOURCES[name]
    examples, stats = _read_config_source(datasets, name)
    files = expand_files([datasets / f for f in spec["files"]])
    file_names = {p.name for p in files}

    assert len(examples) > 0
    assert stats.rows > 0
    assert stats.malformed == KNOWN_MALFORMED.get(name, 0)
    assert len(stats.malformed_examples) == min(stats.malformed, 20)
    if spec["format"] != "self_instruct":  # one conversation per row
        assert len(examples) == stats.rows - stats.malformed
    # Every configured source is large enough for its cap.
    assert len(examples) >= spec["max_examples"]

    origins = set()
    for example in examples:
        _assert_conversation(example.messages)
        match = ORIGIN.match(example.origin)
        assert match, example.origin
        assert match["file"] in file_names
        assert 1 <= int(match["row"]) <= stats.rows
        origins.add(example.origin)
    assert len(origins) == len(examples), "origins must identify rows uniquely"
    # Files are read in (sorted glob, then config) order and rows in file order.
    first = ORIGIN.match(examples[0].origin)
    assert first["file"] == files[0].name


def test_real_alpaca_empty_outputs_skipped_and_named(datasets):
    examples, stats = _read_config_source(datasets, "alpaca")
    assert stats.malformed == 4
    path = datasets / "alpaca" / "random_9k.json.gz"
    assert stats.malformed_examples[0] == f"{path}: row 1462: empty output"
    assert all("empty output" in m for m in stats.malformed_examples)
    assert not any(e.origin == "random_9k.json.gz:1462" for e in examples)
    assert any(e.origin == "random_9k.json.gz:1461" for e in examples)


def test_real_alpaca_error_mode_names_file_and_row(datasets):
    path = datasets / "alpaca" / "random_9k.json.gz"
    with pytest.raises(DataError) as info:
        list(read_source([path], "alpaca", on_malformed="error"))
    message = str(info.value)
    assert str(path) in message
    assert "row 1462" in message
    assert "empty output" in message


def test_real_code_alpaca_two_empty_outputs(datasets):
    _, stats = _read_config_source(datasets, "code_alpaca")
    assert stats.malformed == 2
    assert [m.split(": ")[1] for m in stats.malformed_examples] == ["row 238", "row 1860"]


def test_real_t0_empty_completions_are_three_whole_templates(datasets):
    files = expand_files([datasets / "t0_train_50k" / "*.jsonl.gz"])
    assert len(files) > 3
    assert [p.name for p in files] == sorted(p.name for p in files)
    bad = {}
    for path in files:
        stats = ReadStats()
        examples = list(read_source([path], "prompt_completion", "skip", stats))
        if stats.malformed:
            bad[path.name] = (stats.malformed, stats.rows, len(examples))
    assert set(bad) == T0_EMPTY_TEMPLATES
    assert all(malformed == rows == 200 and kept == 0 for malformed, rows, kept in bad.values())
    _, stats = _read_config_source(datasets, "t0")
    assert stats.malformed == 600


def test_real_t0_endoftext_marker_removed(datasets):
    examples, _ = _read_config_source(datasets, "t0")
    assert not any("<|endoftext|>" in m["content"] for e in examples for m in e.messages)
    # Raw completions do carry the marker.
    path = expand_files([datasets / "t0_train_50k" / "*.jsonl.gz"])[0]
    _, raw = next(iter_records(path))
    assert raw["completion"].endswith("<|endoftext|>")
    first = examples[0]
    assert first.origin == f"{path.name}:1"
    assert first.messages[1]["content"] == raw["completion"].replace("<|endoftext|>", "").strip()


def test_real_flan_cot_unescapes_newlines_and_appends_answer(datasets):
    examples, _ = _read_config_source(datasets, "flan_v2_cot")
    assert not any("\\n" in m["content"] for e in examples for m in e.messages)
    path = datasets / "flan_v2_cot" / "aqua_train.tsv.gz"
    _, (question, answer, rationale) = next(iter_records(path))
    assert "\\n" in question  # the raw file stores literal backslash-n escapes
    first = examples[0]
    assert first.origin == "aqua_train.tsv.gz:1"
    assert first.messages[0]["content"] == question.replace("\\n", "\n").strip()
    assert "\nOptions:\n(A)" in first.messages[0]["content"]
    unescaped_rationale = rationale.replace("\\n", "\n").strip()
    assert first.messages[1]["content"] == f"{unescaped_rationale} So the answer is {answer}."


def test_real_gsm8k_train_keeps_answer_line(datasets):
    examples, stats = _read_config_source(datasets, "gsm8k_train")
    assert stats.rows == 7473 and len(examples) == 7473
    assert all(re.search(r"#### -?[\d,.]+$", e.messages[1]["content"]) for e in examples)


def test_real_self_instruct_seed_tasks(datasets):
    examples, stats = _read_config_source(datasets, "self_instruct")
    assert stats.rows == 175
    assert len(examples) >= 175
    assert all(e.origin.startswith("seed_tasks.jsonl.gz:") for e in examples)


# ---------------------------------------------------------------------------------------------
# Small synthetic files: malformed rows, one per format and failure kind
# ---------------------------------------------------------------------------------------------

GOOD = {
    "alpaca": {"instruction": "Say hi.", "input": "", "output": "Hi."},
    "self_instruct": {"instruction": "Add.", "instances": [{"input": "1 and 2", "output": "3"}]},
    "prompt_completion": {"prompt": "Is the sky blue?", "completion": " yes<|endoftext|>"},
    "gsm8k": {"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
}
GOOD_TSV = ["Question one?\tyes\tBecause it is.", "Question two?\tno\tBecause it is not."]


def _write(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, lines: list) -> Path:
    return _write(path, "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


# (id, format, file name, bad line (str = raw text, else a record), expected message part)
ROW_CASES = [
    ("jsonl-invalid-json", "alpaca", "d.jsonl", '{"instruction": "x", "output": ', "not valid JSON"),
    ("jsonl-not-an-object", "alpaca", "d.jsonl", [1, 2], "expected an object"),
    ("alpaca-missing-instruction", "alpaca", "d.jsonl", {"output": "x"}, "missing field 'instruction'"),
    ("alpaca-missing-answer", "alpaca", "d.jsonl", {"instruction": "x"}, "missing field"),
    ("alpaca-nonstring-instruction", "alpaca", "d.jsonl", {"instruction": 3, "output": "x"}, "field 'instruction' is int"),
    ("alpaca-nonstring-output", "alpaca", "d.jsonl", {"instruction": "x", "output": ["y"]}, "field 'output' is list"),
    ("alpaca-empty-instruction", "alpaca", "d.jsonl", {"instruction": " \n\t ", "output": "x"}, "empty instruction"),
    ("alpaca-empty-output", "alpaca", "d.jsonl", {"instruction": "x", "input": "y", "output": "  \n"}, "empty output"),
    ("alpaca-empty-response", "alpaca", "d.jsonl", {"instruction": "x", "response": " "}, "empty response"),
    ("alpaca-bad-history", "alpaca", "d.jsonl", {"instruction": "x", "output": "y", "history": [["a", 1]]}, "history"),
    ("self-instruct-no-instances", "self_instruct", "d.jsonl", {"instruction": "x", "instances": []}, "instances"),
    (
        "self-instruct-empty-output",
        "self_instruct",
        "d.jsonl",
        {"instruction": "x", "instances": [{"input": "", "output": " "}]},
        "empty output",
    ),
    ("pc-missing-prompt", "prompt_completion", "d.jsonl", {"completion": "x"}, "missing field 'prompt'"),
    ("pc-nonstring-completion", "prompt_completion", "d.jsonl", {"prompt": "p", "completion": 5}, "field 'completion' is int"),
    ("pc-empty-prompt", "prompt_completion", "d.jsonl", {"prompt": " \n ", "completion": "x"}, "empty prompt"),
    ("pc-empty-completion", "prompt_completion", "d.jsonl", {"prompt": "p", "completion": "  <|endoftext|>"}, "empty completion"),
    ("gsm8k-no-hashes", "gsm8k", "d.jsonl", {"question": "q?", "answer": "The answer is 4."}, "####"),
    ("gsm8k-empty-question", "gsm8k", "d.jsonl", {"question": "  ", "answer": "#### 4"}, "empty question"),
    ("gsm8k-nonstring-question", "gsm8k", "d.jsonl", {"question": 7, "answer": "#### 4"}, "field 'question' is int"),
    (
        "messages-bad-role",
        "messages",
        "d.jsonl",
        {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        "message 1: unknown role 'human' (expected one of system, user, assistant)",
    ),
    (
        "messages-empty-content",
        "messages",
        "d.jsonl",
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "Hello"}]},
        "message 1: empty content",
    ),
    (
        "messages-nonstring-content",
        "messages",
        "d.jsonl",
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ["Hello"]}]},
        "message 2: 'content' is list, expected a string",
    ),
    ("messages-no-assistant", "messages", "d.jsonl", {"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message"),
    ("messages-missing", "messages", "d.jsonl", {"conversation": []}, "missing field 'messages'"),
    ("messages-not-a-list", "messages", "d.jsonl", {"messages": "Hi"}, "field 'messages' is str, expected a list"),
    ("messages-empty-list", "messages", "d.jsonl", {"messages": []}, "field 'messages' is an empty list"),
    ("messages-turn-not-object", "messages", "d.jsonl", {"messages": ["Hi", "Hello"]}, "message 1 is str, expected an object"),
    (
        "messages-bad-id",
        "messages",
        "d.jsonl",
        {"id": ["a"], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        "field 'id' is list, expected a string or an integer",
    ),
    (
        "messages-empty-id",
        "messages",
        "d.jsonl",
        {"id": " ", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        "field 'id' is an empty string",
    ),
    (
        "messages-bad-dataset",
        "messages",
        "d.jsonl",
        {"dataset": 3, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        "field 'dataset' is int, expected a string",
    ),
    ("gzip-jsonl-invalid-json", "gsm8k", "d.jsonl.gz", "not json at all", "not valid JSON"),
    ("gzip-jsonl-empty-field", "prompt_completion", "d.jsonl.gz", {"prompt": "p", "completion": ""}, "empty completion"),
    ("json-list-missing-field", "alpaca", "d.json", {"input": "x", "output": "y"}, "missing field 'instruction'"),
    ("json-list-not-an-object", "alpaca", "d.json", "just a string", "expected an object"),
    ("gzip-json-list-empty-output", "alpaca", "d.json.gz", {"instruction": "x", "output": ""}, "empty output"),
    ("tsv-two-columns", "flan_cot", "d.tsv", "Question?\tyes", "expected 3 tab-separated columns"),
    ("tsv-four-columns", "flan_cot", "d.tsv", "Question?\tyes\tbecause\textra", "got 4"),
    ("tsv-empty-rationale", "flan_cot", "d.tsv", "Question?\tyes\t  ", "empty rationale"),
    ("gzip-tsv-one-column", "flan_cot", "d.tsv.gz", "Question only", "expected 3 tab-separated columns"),
]


def _write_case(tmp_path: Path, fmt: str, name: str, bad) -> tuple[Path, int]:
    """A file with a good row, the bad row and another good row; returns (path, bad row number)."""
    path = tmp_path / name
    kind = name.removesuffix(".gz").rsplit(".", 1)[-1]
    if kind == "tsv":
        _write(path, "\n".join([GOOD_TSV[0], bad, GOOD_TSV[1]]) + "\n")
        return path, 2
    if kind == "json":
        bad_record = bad
        _write(path, json.dumps([GOOD[fmt], bad_record, GOOD[fmt]]))
        return path, 2
    # JSONL: a blank line before the bad row checks that rows are physical line numbers.
    _jsonl(path, [GOOD[fmt], "", bad, GOOD[fmt]])
    return path, 3


@pytest.mark.parametrize(("fmt", "name", "bad", "expected"), [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_malformed_row_error_mode_names_file_and_row(tmp_path, fmt, name, bad, expected):
    path, bad_row = _write_case(tmp_path, fmt, name, bad)
    with pytest.raises(DataError) as info:
        list(read_source([path], fmt, on_malformed="error"))
    message = str(info.value)
    assert message.startswith(f"{path}: row {bad_row}: "), message
    assert expected in message


@pytest.mark.parametrize(("fmt", "name", "bad", "expected"), [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_malformed_row_skip_mode_counts_and_keeps_good_rows(tmp_path, fmt, name, bad, expected):
    path, bad_row = _write_case(tmp_path, fmt, name, bad)
    stats = ReadStats()
    examples = list(read_source([path], fmt, on_malformed="skip", stats=stats))
    assert stats.rows == 3
    assert stats.malformed == 1
    assert len(stats.malformed_examples) == 1
    assert stats.malformed_examples[0].startswith(f"{path}: row {bad_row}: ")
    assert expected in stats.malformed_examples[0]
    good_rows = [1, 4] if name.removesuffix(".gz").endswith(".jsonl") else [1, 3]  # jsonl: row 2 is blank
    assert [e.origin for e in examples] == [f"{path.name}:{r}" for r in good_rows]
    for example in examples:
        _assert_conversation(example.messages)


def test_skip_mode_accumulates_over_files_and_limits_examples(tmp_path):
    paths = []
    for i in range(3):
        lines = [GOOD["alpaca"]] + [{"instruction": "x", "output": ""}] * 10
        paths.append(_jsonl(tmp_path / f"f{i}.jsonl", lines))
    stats = ReadStats()
    examples = list(read_source(paths, "alpaca", on_malformed="skip", stats=stats))
    assert len(examples) == 3
    assert stats.rows == 33
    assert stats.malformed == 30
    assert len(stats.malformed_examples) == 20  # messages are capped, the count is not
    assert stats.malformed_examples[0] == f"{paths[0]}: row 2: empty output"


def _files_level_error(paths, fmt="alpaca"):
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as info:
            list(read_source(paths, fmt, on_malformed=mode))
        yield str(info.value)


def test_json_file_that_is_not_a_list(tmp_path):
    path = _write(tmp_path / "obj.json", json.dumps({"instruction": "x", "output": "y"}))
    for message in _files_level_error([path]):
        assert str(path) in message
        assert "expected a JSON list" in message and "dict" in message


def test_json_file_that_does_not_parse(tmp_path):
    path = _write(tmp_path / "broken.json.gz", '[{"instruction": "x", ')
    for message in _files_level_error([path]):
        assert str(path) in message
        assert "not valid JSON" in message


def test_unsupported_extension(tmp_path):
    path = _write(tmp_path / "data.csv", "instruction,output\nx,y\n")
    for message in _files_level_error([path]):
        assert str(path) in message
        assert "unsupported file type 'csv'" in message
    with pytest.raises(DataError, match="unsupported"):
        list(iter_records(path))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    for message in _files_level_error([path]):
        assert message == f"{path}: file not found (is datasets_dir set right?)"


def test_glob_matching_nothing(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [GOOD["alpaca"]])
    pattern = tmp_path / "*.jsonl.gz"
    for message in _files_level_error([pattern]):
        assert str(pattern) in message
        assert "no file matches" in message
    with pytest.raises(DataError, match="no file matches"):
        expand_files([pattern])


def test_glob_expands_in_sorted_order(tmp_path):
    for name in ["b.jsonl", "a.jsonl", "c.jsonl.gz"]:
        _jsonl(tmp_path / name, [{"instruction": f"from {name}", "output": "ok"}])
    plain = tmp_path / "z_plain.json"
    _write(plain, json.dumps([GOOD["alpaca"]]))
    assert expand_files([tmp_path / "*.jsonl", plain]) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl", plain]
    examples = list(read_source([str(tmp_path / "*.jsonl*")], "alpaca"))
    assert [e.origin for e in examples] == ["a.jsonl:1", "b.jsonl:1", "c.jsonl.gz:1"]
    assert [e.messages[0]["content"] for e in examples] == ["from a.jsonl", "from b.jsonl", "from c.jsonl.gz"]


def test_unknown_format_and_mode(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [GOOD["alpaca"]])
    with pytest.raises(DataError, match="unknown source format 'sharegpt'"):
        list(read_source([path], "sharegpt"))
    with pytest.raises(ValueError, match="on_malformed"):
        list(read_source([path], "alpaca", on_malformed="ignore"))


# ---------------------------------------------------------------------------------------------
# Gzip variants and converter output
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["alpaca", "self_instruct", "prompt_completion", "gsm8k", "messages"])
def test_gzip_jsonl_reads_like_plain(tmp_path, fmt):
    records = [GOOD[fmt], GOOD[fmt]]
    plain = list(read_source([_jsonl(tmp_path / "d.jsonl", records)], fmt))
    gz = list(read_source([_jsonl(tmp_path / "d.jsonl.gz", records)], fmt))
    assert len(plain) == 2
    assert [e.messages for e in gz] == [e.messages for e in plain]
    assert [e.origin for e in gz] == ["d.jsonl.gz:1", "d.jsonl.gz:2"]


def test_gzip_json_and_tsv_read_like_plain(tmp_path):
    records = [GOOD["alpaca"], {"instruction": "Translate.", "input": "chat", "output": "cat"}]
    plain = list(read_source([_write(tmp_path / "d.json", json.dumps(records))], "alpaca"))
    gz = list(read_source([_write(tmp_path / "d.json.gz", json.dumps(records))], "alpaca"))
    assert [e.messages for e in gz] == [e.messages for e in plain]
    assert plain[1].messages == [
        {"role": "user", "content": "Translate.\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    text = "\n".join(GOOD_TSV) + "\n"
    plain = list(read_source([_write(tmp_path / "d.tsv", text)], "flan_cot"))
    gz = list(read_source([_write(tmp_path / "d.tsv.gz", text)], "flan_cot"))
    assert len(plain) == 2
    assert [e.messages for e in gz] == [e.messages for e in plain]


def test_flan_cot_escapes_and_answer_sentence(tmp_path):
    row = "Pick one.\\nOptions:\\n(A) red\\n(B) blue\t(B)\tThe sky is blue.\\nSo it is blue."
    path = _write(tmp_path / "cot.tsv", row + "\n")
    (example,) = read_source([path], "flan_cot")
    assert example.messages == [
        {"role": "user", "content": "Pick one.\nOptions:\n(A) red\n(B) blue"},
        {"role": "assistant", "content": "The sky is blue.\nSo it is blue. So the answer is (B)."},
    ]
    assert example.origin == "cot.tsv:1"


def test_flan_cot_tsv_keeps_quotes_literal(tmp_path):
    # QUOTE_NONE: a stray double quote must not swallow the following rows.
    path = _write(tmp_path / "q.tsv", 'He said "hi\tyes\tquote\nSecond?\tno\tplain\n')
    examples = list(read_source([path], "flan_cot"))
    assert [e.messages[0]["content"] for e in examples] == ['He said "hi', "Second?"]
    assert [e.origin for e in examples] == ["q.tsv:1", "q.tsv:2"]


def test_prompt_completion_strips_endoftext(tmp_path):
    path = _jsonl(
        tmp_path / "t0.jsonl",
        [{"prompt": "Question: is it?\n", "completion": " It is.<|endoftext|>"}, {"prompt": "p", "completion": "no marker"}],
    )
    examples = list(read_source([path], "prompt_completion"))
    assert examples[0].messages == [
        {"role": "user", "content": "Question: is it?"},
        {"role": "assistant", "content": "It is."},
    ]
    assert examples[1].messages[1]["content"] == "no marker"


def test_alpaca_history_and_response_key(tmp_path):
    record = {"instruction": "And now?", "input": "", "response": "Done.", "history": [["First?", "One."], ["Second?", "Two."]]}
    (example,) = read_source([_jsonl(tmp_path / "h.jsonl", [record])], "alpaca")
    assert [m["content"] for m in example.messages] == ["First?", "One.", "Second?", "Two.", "And now?", "Done."]
    _assert_conversation(example.messages)


def test_self_instruct_one_conversation_per_instance(tmp_path):
    record = {
        "instruction": "Sort the numbers.",
        "instances": [{"input": "3 1 2", "output": "1 2 3"}, {"input": "", "output": "nothing to sort"}],
    }
    examples = list(read_source([_jsonl(tmp_path / "s.jsonl", [GOOD["self_instruct"], record])], "self_instruct"))
    assert [e.origin for e in examples] == ["s.jsonl:1", "s.jsonl:2.0", "s.jsonl:2.1"]
    assert examples[1].messages[0]["content"] == "Sort the numbers.\n\n3 1 2"
    assert examples[2].messages[0]["content"] == "Sort the numbers."


def test_messages_format_keeps_system_and_turns(tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    (example,) = read_source([_jsonl(tmp_path / "m.jsonl", [record])], "messages")
    assert example.messages == record["messages"]


def test_iter_records_rows_are_one_based_line_numbers(tmp_path):
    path = _write(tmp_path / "r.jsonl", '{"a": 1}\n\n   \n{"a": 2}\nbroken\n')
    records = list(iter_records(path))
    assert [row for row, _ in records] == [1, 4, 5]
    assert records[0][1] == {"a": 1}
    assert isinstance(records[2][1], DataError)
    assert str(records[2][1]).startswith(f"{path}: row 5: not valid JSON")


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    record = {"instruction": "a\u2028b\x0bc", "output": "d\u2029e"}
    path = _write(tmp_path / "u.jsonl", json.dumps(record, ensure_ascii=False) + "\n")
    (example,) = read_source([path], "alpaca")
    assert example.messages[0]["content"] == "a\u2028b\x0bc"


# ---------------------------------------------------------------------------------------------
# Regressions: bugs these tests found (non-string input, bad UTF-8, '####' without a number)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "record"),
    [
        ("alpaca", {"instruction": "x", "input": 5, "output": "y"}),
        ("self_instruct", {"instruction": "x", "instances": [{"input": ["a"], "output": "y"}]}),
    ],
    ids=["alpaca", "self_instruct"],
)
def test_nonstring_input_field_is_a_malformed_row(tmp_path, fmt, record):
    path = _jsonl(tmp_path / "d.jsonl", [GOOD[fmt], record])
    stats = ReadStats()
    examples = list(read_source([path], fmt, on_malformed="skip", stats=stats))
    assert len(examples) == 1 and stats.malformed == 1
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: row 2: "):
        list(read_source([path], fmt, on_malformed="error"))


def test_invalid_utf8_line_is_a_malformed_row(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD["alpaca"]).encode() + b'\n{"instruction": "\xff", "output": "y"}\n')
    stats = ReadStats()
    examples = list(read_source([path], "alpaca", on_malformed="skip", stats=stats))
    assert len(examples) == 1 and stats.malformed == 1


@pytest.mark.parametrize("on_malformed", ["error", "skip"])
@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.json.gz"])
def test_a_cut_off_or_corrupt_gzip_stops_naming_the_file_and_row(tmp_path, on_malformed, name):
    records = [{"instruction": f"Question {i} " + "x" * 200, "input": "", "output": "answer"} for i in range(2000)]
    body = "\n".join(json.dumps(r) for r in records) if name.endswith("jsonl.gz") else json.dumps(records)
    whole = gzip.compress(body.encode())
    cut = tmp_path / name
    cut.write_bytes(whole[: len(whole) // 2])  # a download that stopped half-way
    with pytest.raises(DataError, match=rf"{re.escape(str(cut))}: corrupt or truncated file, stopped (after row \d+|before the first row)"):
        list(read_source([cut], "alpaca", on_malformed=on_malformed))
    corrupt = tmp_path / ("c" + name)
    corrupt.write_bytes(whole[:100] + bytes(256) + whole[356:])
    with pytest.raises(DataError, match=rf"{re.escape(str(corrupt))}: corrupt or truncated file"):
        list(read_source([corrupt], "alpaca", on_malformed=on_malformed))


def test_an_empty_source_file_is_an_error_or_a_counted_skip(tmp_path, caplog):
    empty = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: empty file, 0 rows read"):
        list(read_source([empty], "messages"))
    stats = ReadStats()
    with caplog.at_level("WARNING"):
        assert list(read_source([empty], "alpaca", on_malformed="skip", stats=stats)) == []
    assert stats.empty_files == 1 and f"0 rows read from {empty}" in caplog.text
