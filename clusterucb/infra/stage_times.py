"""Summarise the ``benchmark:`` files of a run: wall time and peak memory per job and per stage.

clusterucb-stage-times [results/benchmarks]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_benchmarks(root: str | Path) -> list[dict]:
    """One row per job: ``stage`` (rule), ``job`` (path under the rule), ``seconds``, ``max_rss_mb``."""
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        with open(path, newline="") as handle:
            records = list(csv.DictReader(handle, delimiter="\t"))
        if not records or "s" not in records[0]:
            continue  # not a Snakemake benchmark file (e.g. a report table under a wider root)
        record = records[-1]
        relative = path.relative_to(root).with_suffix("")
        rss = record.get("max_rss", "NA")
        rows.append(
            {
                "stage": relative.parts[0],
                "job": str(relative),
                "seconds": float(record["s"]),
                "max_rss_mb": float(rss) if rss not in ("NA", "-", "") else float("nan"),
            }
        )
    return rows


def stage_table(rows: list[dict]) -> list[dict]:
    """Per stage: number of jobs, summed job seconds, longest job, peak memory."""
    stages: dict[str, dict] = {}
    for row in rows:
        stage = stages.setdefault(row["stage"], {"stage": row["stage"], "jobs": 0, "total_s": 0.0, "longest_s": 0.0, "max_rss_mb": 0.0})
        stage["jobs"] += 1
        stage["total_s"] += row["seconds"]
        stage["longest_s"] = max(stage["longest_s"], row["seconds"])
        if row["max_rss_mb"] == row["max_rss_mb"]:
            stage["max_rss_mb"] = max(stage["max_rss_mb"], row["max_rss_mb"])
    return sorted(stages.values(), key=lambda s: -s["total_s"])


def to_markdown(table: list[dict]) -> str:
    lines = ["| stage | jobs | total job s | longest job s | peak RSS MB |", "|---|---:|---:|---:|---:|"]
    for s in table:
        lines.append(f"| {s['stage']} | {s['jobs']} | {s['total_s']:.1f} | {s['longest_s']:.1f} | {s['max_rss_mb']:.0f} |")
    total = sum(s["total_s"] for s in table)
    lines.append(f"| **all** | {sum(s['jobs'] for s in table)} | {total:.1f} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="results/benchmarks", help="folder of Snakemake benchmark files")
    args = parser.parse_args(argv)
    rows = read_benchmarks(args.root)
    if not rows:
        raise SystemExit(f"no benchmark files under {args.root}")
    print(to_markdown(stage_table(rows)), end="")


if __name__ == "__main__":
    main()
