"""Stage: a run's selections as JSONL in the pool's own format (open-instruct messages), to train with any stack.

One file per epoch, ``results/selected/<task>/<run>/epoch-<e>.jsonl``, and the last epoch's again under
the stable name ``final.jsonl``. A line is the pool row as the user gave it (``id``, ``dataset``,
``messages``) plus where it stands in the selection (``score``, ``rank``, ``epoch``, ``run``, ``task``)
and our ids (``example_id``, ``source``), in rank order. A row that had no ``id`` of its own (the
converted public sources) gets its ``example_id``, and one without ``dataset`` its source's name; ids
that were JSON integers are written back as integers.
"""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq

from clusterucb.infra.io import atomic_path, read_parquet_metadata

log = logging.getLogger(__name__)

FIELDS = ("id", "dataset", "messages", "score", "rank", "epoch", "run", "task", "example_id", "source")


def _pool_rows(pool_table: str, example_ids: set[str]) -> dict[str, dict]:
    """The pool rows of ``example_ids``, keyed by example id (only those rows are kept in memory)."""
    columns = ["example_id", "id", "dataset", "source", "messages"]
    rows = {}
    for batch in pq.ParquetFile(pool_table).iter_batches(batch_size=8192, columns=columns):
        wanted = [i for i, e in enumerate(batch.column("example_id").to_pylist()) if e in example_ids]
        if wanted:
            for row in batch.take(wanted).to_pylist():
                rows[row["example_id"]] = row
    missing = example_ids - rows.keys()
    if missing:
        raise ValueError(f"{pool_table}: {len(missing)} selected examples are not in the pool, e.g. {sorted(missing)[:3]}")
    return rows


def selected_lines(
    selection: list[dict], pool: dict[str, dict], integer_id_sources: set[str], task: str, run: str, epoch: int
) -> list[str]:
    """One JSON line per selected row, in rank order."""
    lines = []
    for chosen in sorted(selection, key=lambda r: r["rank"]):
        row = pool[chosen["example_id"]]
        own_id = row["id"]
        if own_id is None:
            own_id = row["example_id"]
        elif row["source"] in integer_id_sources:
            own_id = int(own_id)
        record = {
            "id": own_id,
            "dataset": row["dataset"] if row["dataset"] is not None else row["source"],
            "messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]],
            "score": chosen["score"],
            "rank": chosen["rank"],
            "epoch": epoch,
            "run": run,
            "task": task,
            "example_id": row["example_id"],
            "source": row["source"],
        }
        lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False))
    return lines


def write_lines(lines: list[str], out: str) -> None:
    """``lines`` as a UTF-8 JSONL file, written under a temporary name and renamed when complete."""
    with atomic_path(out) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def export_selections(*, selections: list[str], pool_table: str, epoch_outs: list[str], final_out: str, task: str, run: str) -> None:
    """Every epoch's selection of one run for one task as JSONL (``selections[e-1]`` -> ``epoch_outs[e-1]``),
    and the last one again as ``final_out``."""
    if len(selections) != len(epoch_outs):
        raise ValueError(f"{len(selections)} selections for {len(epoch_outs)} output files")
    tables = [pq.read_table(path, columns=["example_id", "rank", "score"]).to_pylist() for path in selections]
    pool = _pool_rows(pool_table, {row["example_id"] for table in tables for row in table})
    sources = read_parquet_metadata(pool_table).get("sources", [])
    integer_id_sources = {s["source"] for s in sources if s.get("integer_ids")}
    lines = []
    for epoch, (table, out) in enumerate(zip(tables, epoch_outs), start=1):
        lines = selected_lines(table, pool, integer_id_sources, task, run, epoch)
        write_lines(lines, out)
        log.info("%s: %d selected examples of epoch %d", out, len(lines), epoch)
    write_lines(lines, final_out)
    log.info("%s: the last epoch's selection (%d examples)", final_out, len(lines))
