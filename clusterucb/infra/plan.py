"""What a run asks of a cluster, read off Snakemake's own dry run: jobs per rule and each rule's requests.

    clusterucb-plan --configfile configs/paper.yaml [any other snakemake option]

runs ``snakemake -n`` in the current directory with those options and prints, per rule, the number of
jobs and the largest ``gpu``, ``cpus_per_gpu`` (set by a profile), ``mem_mb`` (host memory) and
``runtime`` (minutes) any of its jobs requests (``--heavy``: only rules asking for a GPU or > 4 GB); then, for a
config that runs on GPUs, the workflow's GPU memory estimate per job and its warnings (``precision.gpu_memory_gb``). ``mem_mb`` is computed from the model's config.json when the model is there (a hub model
not fetched yet is sized at a provisional 16 GB: fetch it first, or copy its config.json, for the
real figure); every request grows with the attempt on a retry.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SNAKEFILE = Path(__file__).resolve().parents[2] / "Snakefile"
REQUESTS = ("gpu", "cpus_per_gpu", "mem_mb", "runtime")


@dataclass
class RulePlan:
    rule: str
    jobs: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # the largest request of any of its jobs


def parse_dry_run(output: str) -> list[RulePlan]:
    """Per rule of a dry run's printed jobs (in order of first appearance): job count and largest requests."""
    plans: dict[str, RulePlan] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", output):
        header = re.match(r"(?:local)?rule (\w+):\n", block)
        if not header:
            continue
        plan = plans.setdefault(header.group(1), RulePlan(header.group(1)))
        plan.jobs += 1
        found = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        values = dict(item.split("=", 1) for item in found.group(1).split(", ")) if found else {}
        for key in REQUESTS:
            if key in values and values[key].isdigit():
                plan.requests[key] = max(plan.requests.get(key, 0), int(values[key]))
    return list(plans.values())


def markdown(plans: list[RulePlan], heavy_only: bool = False) -> str:
    """The plan as a markdown table (``heavy_only``: rules that ask for a GPU or more than 4 GB)."""
    rows = sorted((p for p in plans if not heavy_only or p.requests.get("gpu") or p.requests.get("mem_mb", 0) > 4000), key=lambda p: p.rule)
    lines = ["| rule | jobs | gpu | cpus_per_gpu | mem_mb | runtime (min) |", "|---|---:|---:|---:|---:|---:|"]
    for p in rows:
        cells = [str(p.requests.get(k, "–")) for k in REQUESTS]
        lines.append(f"| {p.rule} | {p.jobs} | " + " | ".join(cells) + " |")
    total = sum(p.jobs for p in plans)
    gpu_jobs = sum(p.jobs for p in plans if p.requests.get("gpu"))
    lines.append(f"| **all rules** | {total} | {gpu_jobs} GPU jobs | | | |")
    return "\n".join(lines) + "\n"


def gpu_memory_lines(stderr: str) -> list[str]:
    """The workflow's GPU memory estimate and the warnings right after it, as it prints them at start (when the
    config runs on GPUs: ``precision.activations_on_gpu`` or ``precision.gpu_memory_gb``)."""
    lines, state = [], "before"
    for line in stderr.splitlines():
        if state == "before" and line.startswith("GPU memory estimate per job"):
            state = "table"
        elif state == "table" and not line.startswith("  "):
            state = "warnings"
        if state == "warnings" and not line.startswith("WARNING: "):
            break
        if state != "before":
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    heavy_only = "--heavy" in args
    args = [a for a in args if a != "--heavy"]
    command = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(SNAKEFILE), *args]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        return proc.returncode
    plans = parse_dry_run(proc.stdout)
    if not plans:
        print("Nothing to be done: every output is up to date.")
        return 0
    print(markdown(plans, heavy_only), end="")
    gpu = gpu_memory_lines(proc.stderr)
    if gpu:
        print("\n" + "\n".join(gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
