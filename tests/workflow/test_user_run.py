"""A user's own pool and model through the workflow: only their rows, their ids kept, the selection out as
JSONL; the embedded demo only without a config file; the paper's config planned for a cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from dag import REPO, planned_jobs

pytestmark = pytest.mark.workflow

USER_CPU = REPO / "tests" / "config" / "user-cpu.yaml"


def snakemake(workdir: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def readme_block(marker: str) -> str:
    """The fenced block right after ``<!-- marker -->`` in README.md."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", text, re.DOTALL)
    assert match, f"README.md has no block after <!-- {marker} -->"
    return match.group(1)


def write_user_pool(path: Path, datasets: Path, n: int) -> list[dict]:
    """A messages JSONL of ``n`` real conversations (Dolly's), with the user's own ids and dataset name."""
    from clusterucb.data.sources import read_source

    examples = read_source([datasets / "dolly" / "dolly_3k.json.gz"], "alpaca", on_malformed="skip")
    rows = [{"dataset": "mydolly", "id": f"mydolly_{i:04d}", "messages": e.messages} for i, e in zip(range(n), examples)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def save_small_model(directory: Path, texts: list[str]) -> None:
    """A small Llama with its own tokenizer, saved as a local Hugging Face model directory."""
    from clusterucb.models.modeling import TinyLlamaSpec, build_tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(texts, 600)
    spec = TinyLlamaSpec(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=4096,
    )
    model = build_tiny_llama(spec, tokenizer, seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_an_overlay_with_one_source_builds_a_pool_of_only_that_source(datasets, tmp_path):
    """The issue's overlay, as a user wrote it (no model yet): the pool is their rows, with their ids."""
    rows = write_user_pool(tmp_path / "mine.jsonl", datasets, 60)
    overlay = tmp_path / "mine.yaml"
    overlay.write_text(
        f"data:\n  sources:\n    mine: {{format: messages, files: [{tmp_path / 'mine.jsonl'}], max_examples: null}}\ntarget:\n  tasks: [mmlu]\n"
    )
    proc = snakemake(
        tmp_path, "--cores", "2", "--configfile", str(overlay), "--config", f"datasets_dir={datasets}", "--", "results/data/pool.parquet"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pool = pq.read_table(tmp_path / "results/data/pool.parquet").to_pylist()
    assert {r["source"] for r in pool} == {"mine"}
    assert [(r["id"], r["dataset"], r["messages"]) for r in pool] == [(r["id"], r["dataset"], r["messages"]) for r in rows]
    assert (
        "source mine: 60 rows read, 0 malformed, 0 repeated ids, 0 duplicates, 0 decontaminated"
        in (tmp_path / "logs/build_pool.log").read_text()
    )
    # Jobs that load a model say the model is missing, by its key.
    plan = snakemake(tmp_path, "-n", "--configfile", str(overlay), "--config", f"datasets_dir={datasets}")
    assert plan.returncode != 0 and "config key 'model' is not set" in plan.stdout + plan.stderr


def test_a_plain_run_is_the_embedded_demo_and_an_empty_pool_is_refused(datasets, tmp_path):
    demo = snakemake(tmp_path, "-n", "--config", f"datasets_dir={datasets}")
    assert demo.returncode == 0, demo.stderr[-2000:]
    jobs = planned_jobs(demo.stdout)
    assert jobs["build_base_model"] == 1 and jobs["select_budgeted"] == 2  # the demo: built-in model, 2 epochs, 2 budgeted runs
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text("model: builtin-tiny\n")
    refused = snakemake(tmp_path, "-n", "--configfile", str(nothing), "--config", f"datasets_dir={datasets}")
    assert refused.returncode != 0 and "config key 'data.sources' is empty" in refused.stdout + refused.stderr


def test_select_data_for_your_own_model_as_the_readme_says(datasets, tmp_path):
    """README, "Select data for your own model": its pool format and overlay, a local model directory, MMLU,
    run to the exported selection (with tests/config/user-cpu.yaml sizing it for 2 CPU cores)."""
    example = [json.loads(line) for line in readme_block("pool-example").splitlines()]
    (tmp_path / "pool").mkdir()
    rows = example + write_user_pool(tmp_path / "pool" / "mine.jsonl", datasets, 300)  # the README's own two rows first
    (tmp_path / "pool" / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = tmp_path / "my-model"
    save_small_model(model_dir, [m["content"] for r in rows for m in r["messages"]])
    overlay = readme_block("user-overlay").replace("/abs/path/mine.jsonl", str(tmp_path / "pool" / "mine.jsonl"))
    overlay = re.sub(r"^model: \S+", f"model: {model_dir}", overlay, flags=re.M)
    assert yaml.safe_load(overlay)["target"]["tasks"] == ["mmlu"]
    (tmp_path / "mine.yaml").write_text(overlay)
    config = ("--configfile", str(tmp_path / "mine.yaml"), str(USER_CPU), "--config", f"datasets_dir={datasets}")
    target = "results/selected/mmlu/clusterucb/final.jsonl"
    proc = snakemake(tmp_path, "--cores", "2", "--max-threads", "1", *config, "--", target)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]

    pool = pq.read_table(tmp_path / "results/data/pool.parquet").to_pylist()
    assert {r["source"] for r in pool} == {"mine"} and len(pool) == len(rows)
    assert sorted(r["id"] for r in pool) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: r for r in rows}
    epochs = yaml.safe_load(USER_CPU.read_text())["train"]["epochs"]
    for epoch in range(1, epochs + 1):
        run = "full_matching" if epoch == 1 else "clusterucb"
        selection = pq.read_table(tmp_path / f"results/runs/mmlu/{run}/epoch-{epoch}/selection.parquet").to_pylist()
        lines = [json.loads(line) for line in (tmp_path / f"results/selected/mmlu/clusterucb/epoch-{epoch}.jsonl").read_text().splitlines()]
        assert [line["id"] for line in lines] == [s["id"] for s in selection] and len(lines) > 20
        for line, chosen in zip(lines, selection):
            assert (line["rank"], line["epoch"], line["run"], line["task"]) == (chosen["rank"], epoch, "clusterucb", "mmlu")
            assert line["score"] == pytest.approx(chosen["score"])
            assert {k: line[k] for k in ("dataset", "id", "messages")} == by_id[line["id"]]  # the user's row, field for field
    final = tmp_path / target
    assert final.read_bytes() == (tmp_path / f"results/selected/mmlu/clusterucb/epoch-{epochs}.jsonl").read_bytes()
    before = final.read_bytes()
    again = snakemake(tmp_path, "--cores", "1", *config, "--forcerun", "export_selections", "--", target)
    assert again.returncode == 0, again.stderr[-3000:]
    assert final.read_bytes() == before


def test_the_paper_config_plans_its_cluster_requests(datasets, tmp_path):
    """configs/paper.yaml dry-runs (its pool files stand in empty) and clusterucb-plan prints what it asks for."""
    mirror = tmp_path / "datasets"
    mirror.mkdir()
    for folder in datasets.iterdir():
        (mirror / folder.name).symlink_to(folder, target_is_directory=folder.is_dir())
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    for source in paper["data"]["sources"].values():
        for file in source["files"]:
            (mirror / file).parent.mkdir(parents=True, exist_ok=True)
            (mirror / file).touch()
    # The hub model's config.json (Llama-2-7B's shape), so that memory requests are computed, not provisional.
    hub = tmp_path / "resources/models/hub/meta-llama--Llama-2-7b-hf@main"
    hub.mkdir(parents=True)
    hub.joinpath("config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 32000,
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
            }
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clusterucb.infra.plan",
            "--heavy",
            "--workflow-profile",
            str(REPO / "profiles/slurm"),
            "--configfile",
            str(REPO / "configs/paper.yaml"),
            "--config",
            f"datasets_dir={mirror}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    printed = proc.stdout.split("\n\n", 1)[0].strip()
    # README.md shows this table: it must be what the plan prints.
    readme = (REPO / "README.md").read_text().split("<!-- paper-plan -->\n", 1)[1].split("\n\n", 1)[0].strip()
    assert readme == printed, "README.md's paper plan differs from clusterucb-plan's:\n" + printed
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in printed.splitlines()[2:]}
    # 4 epochs x 4 targets: 16 budgeted re-selections per budgeted run after epoch 1 (3 each), a 7B model's memory.
    assert table["grads_pool_shard"][1:3] == ["1", "8"] and table["select_budgeted"][0] == str(2 * 3 * 4)
    assert table["train_epoch"][0] == "60" and int(table["warmup_lora"][3]) > 16_000
    assert "GPU jobs" in proc.stdout and "GPU memory estimate per job" in proc.stdout
