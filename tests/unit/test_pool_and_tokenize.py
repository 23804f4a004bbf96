"""Unit tests of the pool builder (clusterucb.data.pool) and tokenization with label masking."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from clusterucb.data.pool import Decontaminator, build_pool, example_id, pool_table
from clusterucb.data.sources import DataError
from clusterucb.data.tokenize import (
    IGNORE_INDEX,
    EncodeStats,
    concat_messages,
    encode_messages,
    encode_prompt_completion,
    encode_rows,
)
from clusterucb.data.tokens import TokenTable, count_rows, tokens_schema, write_tokens
from clusterucb.infra.io import write_parquet

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# build_pool on synthetic sources
# ---------------------------------------------------------------------------------------------


def _alpaca(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag} task number {i}.", "input": "", "output": f"{tag} answer {i}."} for i in range(n)]


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "big.json").write_text(json.dumps(_alpaca(40, "big")))
    (tmp_path / "small.jsonl").write_text(
        "".join(json.dumps({"prompt": f"small prompt {i}", "completion": f"c{i}"}) + "\n" for i in range(6))
    )
    # 10 distinct rows, then 3 exact copies of rows 0, 1 and 1 again.
    dup = _alpaca(10, "dup")
    (tmp_path / "dup.json").write_text(json.dumps(dup + [dup[0], dup[1], dup[1]]))
    return tmp_path


SOURCES = {
    "zeta_big": {"format": "alpaca", "files": ["big/big.json"], "max_examples": 7},
    "alpha_small": {"format": "prompt_completion", "files": ["small.jsonl"], "max_examples": 100},
    "mid_dup": {"format": "alpaca", "files": ["dup.json"], "max_examples": None},
}


def test_build_pool_caps_order_and_ids(pool_dir):
    rows, reports = build_pool(SOURCES, pool_dir, [], seed=3)
    by_source = {r.source: r for r in reports}
    assert [r.source for r in reports] == list(SOURCES)
    assert by_source["zeta_big"].kept == 7 and by_source["zeta_big"].rows_read == 40
    assert by_source["alpha_small"].kept == 6  # cap above the source size: all of it
    assert by_source["mid_dup"].kept == 10
    assert len(rows) == 7 + 6 + 10

    # Grouped by source in config order (not alphabetical), rows in source-file order.
    sources_seq = [r["source"] for r in rows]
    assert sources_seq == ["zeta_big"] * 7 + ["alpha_small"] * 6 + ["mid_dup"] * 10
    for name in SOURCES:
        row_numbers = [int(r["origin"].rsplit(":", 1)[1]) for r in rows if r["source"] == name]
        assert row_numbers == sorted(row_numbers)
    assert [r["origin"] for r in rows if r["source"] == "alpha_small"] == [f"small.jsonl:{i}" for i in range(1, 7)]

    ids = [r["example_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for row in rows:
        assert set(row) == {"example_id", "id", "dataset", "source", "origin", "messages"}
        assert row["id"] is None and row["dataset"] is None  # only the messages format carries its own
        assert row["example_id"] == example_id(row["source"], row["messages"])
        assert re.fullmatch(rf"{re.escape(row['source'])}-[0-9a-f]{{16}}", row["example_id"])

    table = pool_table(rows)
    assert table.num_rows == len(rows)
    assert table.column("example_id").to_pylist() == ids
    assert table.column("messages").to_pylist()[0] == rows[0]["messages"]


def test_build_pool_deterministic_per_seed(pool_dir):
    first, _ = build_pool(SOURCES, pool_dir, [], seed=11)
    again, _ = build_pool(SOURCES, pool_dir, [], seed=11)
    other, _ = build_pool(SOURCES, pool_dir, [], seed=12)
    assert first == again
    pick = lambda rows: [r["example_id"] for r in rows if r["source"] == "zeta_big"]  # noqa: E731
    assert len(pick(first)) == len(pick(other)) == 7
    assert pick(first) != pick(other)  # capped source: the seed changes the draw
    # Uncapped sources do not depend on the seed.
    assert [r for r in first if r["source"] != "zeta_big"] == [r for r in other if r["source"] != "zeta_big"]


def test_build_pool_source_draw_independent_of_later_sources(pool_dir):
    only_first = {"zeta_big": SOURCES["zeta_big"]}
    rows_a, _ = build_pool(only_first, pool_dir, [], seed=5)
    rows_b, _ = build_pool(SOURCES, pool_dir, [], seed=5)
    assert rows_a == [r for r in rows_b if r["source"] == "zeta_big"]


def test_build_pool_duplicates_counted_never_repeated(pool_dir):
    rows, reports = build_pool(SOURCES, pool_dir, [], seed=0)
    report = next(r for r in reports if r.source == "mid_dup")
    assert report.rows_read == 13
    assert report.duplicates == 3
    assert report.kept == 10
    dup_rows = [r for r in rows if r["source"] == "mid_dup"]
    contents = [json.dumps(r["messages"]) for r in dup_rows]
    assert len(set(contents)) == len(contents) == 10
    # With a cap, a duplicate still never appears twice.
    for seed in range(5):
        capped = {"mid_dup": SOURCES["mid_dup"] | {"max_examples": 9}}
        rows, (rep,) = build_pool(capped, pool_dir, [], seed=seed)
        assert len(rows) == 9
        assert len({r["example_id"] for r in rows}) == 9


def test_build_pool_malformed_rows(pool_dir):
    (pool_dir / "bad.jsonl").write_text(
        json.dumps({"instruction": "ok", "output": "fine"}) + "\n" + json.dumps({"instruction": "ok", "output": " "}) + "\n"
    )
    spec = {"bad": {"format": "alpaca", "files": ["bad.jsonl"], "max_examples": None}}
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: empty output"):
        build_pool(spec, pool_dir, [], seed=0)
    rows, (report,) = build_pool(spec, pool_dir, [], seed=0, on_malformed="skip")
    assert len(rows) == 1 and report.malformed == 1 and report.rows_read == 2
    assert "row 2" in report.malformed_examples[0]


def test_build_pool_empty_is_an_error(tmp_path):
    (tmp_path / "all_bad.jsonl").write_text(json.dumps({"instruction": "x", "output": ""}) + "\n")
    spec = {"s": {"format": "alpaca", "files": ["all_bad.jsonl"], "max_examples": 5}}
    with pytest.raises(ValueError, match="pool is empty"):
        build_pool(spec, tmp_path, [], seed=0, on_malformed="skip")


def test_example_id_stable():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    eid = example_id("alpaca", messages)
    assert eid == example_id("alpaca", copy.deepcopy(messages))
    assert eid == example_id("alpaca", [{"content": m["content"], "role": m["role"]} for m in messages])  # key order
    assert re.fullmatch(r"alpaca-[0-9a-f]{16}", eid)
    assert example_id("dolly", messages) != eid
    assert example_id("dolly", messages).startswith("dolly-")
    changed = copy.deepcopy(messages)
    changed[1]["content"] = "Hello!"
    assert example_id("alpaca", changed) != eid


QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def test_decontamination_excludes_target_questions(tmp_path):
    mangled = "natalia SOLD clips to 48 of her friends in april -- and then she sold half as many clips in may!!\n\nHow many clips   did natalia sell altogether in April AND May"
    records = [
        {"instruction": "Solve this problem: " + mangled + "?? Show your work.", "input": "", "output": "72"},
        {"instruction": "Write a poem about clips.", "input": "", "output": "Clips clip."},
        {"instruction": "Natalia sold clips to 48 of her friends.", "input": "", "output": "Partial overlap is fine."},
        {"instruction": "Answer the question.", "input": QUESTION.upper(), "output": "72"},  # question in the input
        {"instruction": "Copy the answer.", "input": "", "output": QUESTION},  # only in the assistant turn
    ]
    (tmp_path / "p.json").write_text(json.dumps(records))
    spec = {"p": {"format": "alpaca", "files": ["p.json"], "max_examples": None}}
    rows, (report,) = build_pool(spec, tmp_path, [QUESTION, "Short question here?"], seed=0)
    assert report.contaminated == 2
    assert report.kept == 3
    assert sorted(r["origin"] for r in rows) == ["p.json:2", "p.json:3", "p.json:5"]


def test_decontaminator_short_questions_and_roles():
    decon = Decontaminator(["What is 7 times 8?", "", "   ", QUESTION])
    assert len(decon) == 2  # empty questions are ignored
    user = lambda text: [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]  # noqa: E731
    assert decon.contaminated(user("Quiz: WHAT is 7 times 8 ???"))
    assert not decon.contaminated(user("What is 7 times 9?"))
    assert decon.contaminated([{"role": "system", "content": "what is 7  times 8"}, {"role": "assistant", "content": "56"}])
    assert not decon.contaminated([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "What is 7 times 8?"}])
    assert not decon.contaminated(user("!!!"))


def test_decontaminator_unicode_words_and_too_short_texts():
    decon = Decontaminator(["Milloin Charles Fort syntyi?", "Когда родился Пушкин?", "Why?", "Who is he"])
    assert len(decon) == 3 and decon.too_short == 1  # "Why?": one word
    user = lambda text: [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]  # noqa: E731
    assert decon.contaminated(user("Kysymys: MILLOIN Charles Fort syntyi"))
    assert decon.contaminated(user("вопрос: когда родился пушкин"))
    assert not decon.contaminated(user("когда родился толстой"))
    assert not decon.contaminated(user("1799"))  # digits alone never stand for a non-Latin question
    assert decon.contaminated(user("Tell me: who is he?")) and not decon.contaminated(user("why"))


# ---------------------------------------------------------------------------------------------
# Tokenization (a real byte-level BPE tokenizer trained here)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from clusterucb.models.modeling import train_tokenizer

    texts = [f"<|user|>\nWhat is {i} plus {i + 1}?\n<|assistant|>\nIt is {2 * i + 1}.</s>\n" for i in range(30)]
    texts += [
        "Tell me a story about cats.",
        "Cats are nice animals and dogs are loyal.",
        "Answer the following question.",
        "Question: how many apples are left?",
        "Answer: there are five apples left.",
        "Hello world, hello there.",
    ] * 3
    tokenizer = train_tokenizer(texts, vocab_size=400)
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    return tokenizer


def _trained_spans(input_ids, labels):
    """Maximal runs of trained positions, as lists of token ids."""
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        spans.append(current)
    return spans


SINGLE = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "It is 7."}]
MULTI = [
    {"role": "user", "content": "  What is 3 plus 4?\n"},
    {"role": "assistant", "content": "It is 7."},
    {"role": "user", "content": "Tell me a story about cats."},
    {"role": "assistant", "content": "Cats are nice animals."},
]


def test_concat_messages_tulu_format():
    assert concat_messages(SINGLE, "</s>") == "<|user|>\nWhat is 3 plus 4?\n<|assistant|>\nIt is 7.</s>\n"
    system = [{"role": "system", "content": " Be brief. "}] + MULTI
    assert concat_messages(system, "<eos>") == (
        "<|system|>\nBe brief.\n<|user|>\nWhat is 3 plus 4?\n<|assistant|>\nIt is 7.<eos>\n"
        "<|user|>\nTell me a story about cats.\n<|assistant|>\nCats are nice animals.<eos>\n"
    )
    with pytest.raises(ValueError, match="invalid role"):
        concat_messages([{"role": "tool", "content": "x"}], "</s>")


def test_encode_messages_single_turn(tok):
    input_ids, labels, full_length = encode_messages(SINGLE, tok, max_length=512)
    text = concat_messages(SINGLE, tok.eos_token)
    assert input_ids == tok(text)["input_ids"]
    assert input_ids[0] == tok.bos_token_id
    assert full_length == len(input_ids)
    prompt_len = len(tok("<|user|>\nWhat is 3 plus 4?\n<|assistant|>\n")["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == input_ids[prompt_len:]
    assert tok.decode(input_ids[prompt_len:]) == "It is 7.</s>\n"
    assert tok.decode(input_ids[:prompt_len], skip_special_tokens=False) == "<s><|user|>\nWhat is 3 plus 4?\n<|assistant|>\n"


def test_encode_messages_multi_turn(tok):
    input_ids, labels, full_length = encode_messages(MULTI, tok, max_length=512)
    assert input_ids == tok(concat_messages(MULTI, tok.eos_token))["input_ids"]
    assert full_length == len(input_ids)
    spans = _trained_spans(input_ids, labels)
    assert [tok.decode(s) for s in spans] == ["It is 7.</s>\n", "Cats are nice animals.</s>\n"]
    # Exactly the user turns and their "<|assistant|>\n" markers (plus BOS) are masked.
    masked = [t for t, label in zip(input_ids, labels) if label == IGNORE_INDEX]
    assert tok.decode(masked, skip_special_tokens=False) == (
        "<s><|user|>\nWhat is 3 plus 4?\n<|assistant|>\n<|user|>\nTell me a story about cats.\n<|assistant|>\n"
    )
    assert labels[-1] == input_ids[-1] and tok.decode(input_ids[-2:]) == "</s>\n"


def test_encode_messages_truncation(tok):
    _, _, full_length = encode_messages(MULTI, tok, max_length=512)
    for max_length in (5, 12, 20, full_length - 3, full_length):
        input_ids, labels, n = encode_messages(MULTI, tok, max_length=max_length)
        assert n == full_length
        assert len(input_ids) == len(labels) <= max_length
        full_ids, full_labels, _ = encode_messages(MULTI, tok, max_length=512)
        assert input_ids == full_ids[: len(input_ids)]
        assert labels == full_labels[: len(labels)]
    input_ids, labels, _ = encode_messages(MULTI, tok, max_length=8)
    assert len(input_ids) == 8 and all(label == IGNORE_INDEX for label in labels)


def test_encode_messages_unknown_template(tok):
    with pytest.raises(ValueError, match="unknown chat template"):
        encode_messages(SINGLE, tok, 64, template="chatml")
    with pytest.raises(ValueError, match="no chat_template"):
        encode_messages(SINGLE, tok, 64, template="tokenizer")


def test_encode_prompt_completion_masks_prompt_with_bos(tok):
    prompt = "<|user|>\nAnswer the following question.\n\nQuestion: how many apples are left?\n<|assistant|>\nAnswer:"
    completion = " there are five apples left."
    input_ids, labels, full_length = encode_prompt_completion(prompt, completion, tok, max_length=512)
    n_prompt = len(tok(prompt)["input_ids"])
    assert input_ids == tok(prompt + completion)["input_ids"]
    assert input_ids[0] == tok.bos_token_id
    assert full_length == len(input_ids)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == input_ids[n_prompt:]
    assert tok.decode(input_ids[n_prompt:]) == completion
    ids, labels, n = encode_prompt_completion(prompt, completion, tok, max_length=10)
    assert len(ids) == 10 and n == full_length and labels == [IGNORE_INDEX] * 10


def _rows_encoder(tok, max_length):
    return lambda row: encode_messages(row["messages"], tok, max_length)


def test_encode_rows_overlong_modes(tok):
    short = {"example_id": "s-1", "messages": SINGLE}
    long_ = {"example_id": "l-1", "messages": MULTI}
    n_short = encode_messages(SINGLE, tok, 512)[2]
    n_long = encode_messages(MULTI, tok, 512)[2]
    max_length = n_short + 2
    assert n_long > max_length > n_short
    encode = _rows_encoder(tok, max_length)

    stats = EncodeStats()
    out = encode_rows([short, long_], encode, max_length, overlong="truncate", stats=stats)
    assert [r["example_id"] for r in out] == ["s-1", "l-1"]
    assert stats.as_dict() == {"total": 2, "kept": 2, "truncated": 1, "skipped_overlong": 0, "skipped_no_target": 0}
    assert out[1]["truncated"] and not out[0]["truncated"]
    assert out[1]["n_tokens"] == len(out[1]["input_ids"]) <= max_length
    assert out[0]["n_target_tokens"] == sum(label != IGNORE_INDEX for label in out[0]["labels"]) > 0

    stats = EncodeStats()
    out = encode_rows([short, long_], encode, max_length, overlong="skip", stats=stats)
    assert [r["example_id"] for r in out] == ["s-1"]
    assert stats.as_dict() == {"total": 2, "kept": 1, "truncated": 0, "skipped_overlong": 1, "skipped_no_target": 0}

    with pytest.raises(ValueError, match=rf"example l-1 has {n_long} tokens > max_length {max_length}"):
        encode_rows([short, long_], encode, max_length, overlong="error")

    with pytest.raises(ValueError, match="overlong"):
        encode_rows([short], encode, max_length, overlong="drop")
    with pytest.raises(ValueError, match="on_unusable"):
        encode_rows([short], encode, max_length, on_unusable="ignore")


def test_encode_rows_unusable(tok):
    prompt = "<|user|>\nAnswer the following question.\n\nQuestion: how many apples are left?\n<|assistant|>\nAnswer:"
    n_prompt = len(tok(prompt)["input_ids"])
    max_length = n_prompt  # the prompt fills max_length: nothing left to train
    rows = [
        {"example_id": "gsm-full", "prompt": prompt, "completion": " five apples."},
        {"example_id": "gsm-ok", "prompt": "Question: apples?", "completion": " five apples."},
    ]
    encode = lambda row: encode_prompt_completion(row["prompt"], row["completion"], tok, max_length)  # noqa: E731
    stats = EncodeStats()
    out = encode_rows(rows, encode, max_length, overlong="truncate", on_unusable="skip", stats=stats)
    assert [r["example_id"] for r in out] == ["gsm-ok"]
    assert stats.as_dict() == {"total": 2, "kept": 1, "truncated": 0, "skipped_overlong": 0, "skipped_no_target": 1}
    with pytest.raises(ValueError, match="example gsm-full has no trainable token"):
        encode_rows(rows, encode, max_length, overlong="truncate", on_unusable="error")

    # Multi-turn rows truncated inside the first prompt are unusable too.
    stats = EncodeStats()
    out = encode_rows([{"example_id": "m-1", "messages": MULTI}], _rows_encoder(tok, 8), 8, stats=stats)
    assert out == [] and stats.skipped_no_target == 1 and stats.total == 1


# ---------------------------------------------------------------------------------------------
# The tokenized pool on disk: chunked, parallel, memory-mapped (clusterucb.data.tokens)
# ---------------------------------------------------------------------------------------------


def _pool_parquet(path: Path, n: int) -> None:
    rows = [
        {
            "example_id": f"ex-{i:05d}",
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i + 1}?"},
                {"role": "assistant", "content": f"It is {2 * i + 1}."},
            ],
        }
        for i in range(n)
    ]
    write_parquet(pool_table_like(rows), path)


def pool_table_like(rows):
    import pyarrow as pa

    message = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
    return pa.Table.from_pylist(rows, schema=pa.schema([pa.field("example_id", pa.string()), pa.field("messages", pa.list_(message))]))


def test_tokenize_pool_same_file_for_any_worker_count(tok, tmp_path, monkeypatch):
    from clusterucb.pipeline import data

    model_dir = tmp_path / "tok"
    tok.save_pretrained(str(model_dir))
    pool = tmp_path / "pool.parquet"
    _pool_parquet(pool, 50)
    monkeypatch.setattr(data, "TOKENIZE_CHUNK_ROWS", 8)  # several chunks, more than the workers
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"tokens-{workers}.arrow"
        data.tokenize_pool(
            pool_path=str(pool),
            model_dir=str(model_dir),
            out=str(out),
            max_length=64,
            chat_template="tulu",
            overlong="truncate",
            on_unusable="skip",
            workers=workers,
            scratch=str(tmp_path / f"scratch-{workers}"),
        )
        outputs[workers] = out.read_bytes()
        assert not (tmp_path / f"scratch-{workers}").exists()
    assert outputs[1] == outputs[2]

    table = TokenTable.open(tmp_path / "tokens-2.arrow")
    meta = table.meta
    assert meta["max_length"] == 64 and meta["encode_stats"]["total"] == 50
    assert len(table) == meta["encode_stats"]["kept"] == count_rows(tmp_path / "tokens-2.arrow")
    # every row equals what the serial encoder makes of it, in pool order
    for i in (0, 9, len(table) - 1):
        row = table[i]
        messages = [{"role": "user", "content": f"What is {int(row['example_id'][3:])} plus {int(row['example_id'][3:]) + 1}?"}]
        ids, labels, _ = encode_messages(
            messages + [{"role": "assistant", "content": f"It is {2 * int(row['example_id'][3:]) + 1}."}], tok, 64
        )
        assert row["input_ids"].tolist() == ids and row["labels"].tolist() == labels and row["n_tokens"] == len(ids)
    assert table.ids() == sorted(table.ids())


def test_token_table_rows_slices_and_lookup(tmp_path):
    import numpy as np
    import pyarrow as pa

    schema = tokens_schema(metadata={"max_length": 4})
    records = [
        {
            "example_id": f"e{i}",
            "input_ids": list(range(i + 1)),
            "labels": [-100] + list(range(1, i + 1)),
            "n_tokens": i + 1,
            "n_target_tokens": i,
            "truncated": False,
        }
        for i in range(10)
    ]
    # two record batches, so row lookup crosses a batch boundary
    path = tmp_path / "t.arrow"
    write_tokens([pa.Table.from_pylist(records[:6], schema=schema), pa.Table.from_pylist(records[6:], schema=schema)], schema, path)
    table = TokenTable.open(path)
    assert len(table) == 10 and table.meta["max_length"] == 4
    assert table[7]["input_ids"].tolist() == list(range(8)) and table[7]["example_id"] == "e7" and table[-1]["n_tokens"] == 10
    part = table[5:8]
    assert part.ids() == ["e5", "e6", "e7"] and part[1]["labels"].tolist() == [-100, 1, 2, 3, 4, 5, 6]
    assert table.take([9, 0]).ids() == ["e9", "e0"]
    assert table.indices_of(["e3", "nope", "e9"]).tolist() == [3, -1, 9]
    assert np.array_equal(table.lengths(), np.arange(1, 11))
    with pytest.raises(IndexError):
        table[10]
    # a TokenTable row feeds the batcher like a list row
    from clusterucb.features.gradients import pad_batch

    input_ids, mask, labels = pad_batch([table[2], records[3]], pad_id=0, device="cpu")
    assert input_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]] and mask.sum().item() == 7
