"""The tiny DAG, up to the first ClusterUCB re-selection, through profiles/slurm on a real single-node SLURM cluster.

Proven from SLURM's own records (sacct), not Snakemake's log: every non-local rule ran as a SLURM job, GPU rules
asked for and were given a GPU (gres/gpu in AllocTRES) and CPU rules were not; a job cancelled with scancel while
running and a node drained then resumed still end in a finished run whose selections equal the local run's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dag import REPO, planned_job_wildcards, rule_blocks, snakemake_cmd
from slurm_cluster import SlurmCluster, missing_tools

pytestmark = pytest.mark.workflow

# One target and the two budgeted runs keep the scenario short; the pool, warmup, clusters and seeds are the
# tiny run's, so these selections must equal the local tiny run's.
OVERRIDES = ("target={tasks: [gsm8k]}", "selection={methods: [clusterucb, random_draw]}")
TARGETS = [f"results/runs/gsm8k/{run}/epoch-2/selection.parquet" for run in ("clusterucb", "random_draw")]
FAULT_RULE = "train_epoch"  # cancelled once while running; the profile's retries resubmit it


LOCAL_RULES = {name for name, body in rule_blocks().items() if "localrule: True" in body}
GPU_RULES = {name for name, body in rule_blocks().items() if re.search(r"^\s+gpu=1,", body, re.MULTILINE)}


def command(workdir: Path, datasets: Path, *args: str) -> list[str]:
    return snakemake_cmd(workdir, datasets, *args, config=OVERRIDES, targets=tuple(TARGETS))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_tools()
    if missing or os.geteuid() != 0:
        pytest.skip(f"a SLURM test cluster needs root and {', '.join(missing) or 'nothing else'} (.ci/run installs them)")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


class Faults(threading.Thread):
    """Cancel the first running FAULT_RULE job once; drain the node while jobs run, resume it 5 s later."""

    def __init__(self, cluster: SlurmCluster):
        super().__init__(daemon=True)
        self.cluster, self.stop = cluster, threading.Event()
        self.cancelled: str | None = None
        self.drained = self.resumed = False

    def squeue(self) -> list[tuple[str, str, str]]:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], env=self.cluster.env, capture_output=True, text=True).stdout
        return [tuple(line.split("|", 2)) for line in out.splitlines() if line.count("|") == 2]

    def run(self) -> None:
        host = self.cluster.host
        while not self.stop.is_set() and not (self.cancelled and self.resumed):
            jobs = self.squeue()
            if not self.drained and any(state == "RUNNING" for _, state, _ in jobs):
                subprocess.run(
                    ["scontrol", "update", f"nodename={host}", "state=drain", "reason=ci-drain"], env=self.cluster.env, check=True
                )
                self.drained = True
                time.sleep(5)
                subprocess.run(["scontrol", "update", f"nodename={host}", "state=resume"], env=self.cluster.env, check=True)
                self.resumed = True
            for job_id, state, comment in jobs:
                if not self.cancelled and state == "RUNNING" and comment.startswith(f"rule_{FAULT_RULE}"):
                    time.sleep(2)  # let it get going
                    subprocess.run(["scancel", job_id], env=self.cluster.env, check=True)
                    self.cancelled = job_id
            time.sleep(0.5)


def test_the_tiny_dag_runs_on_slurm_with_a_cancelled_job_and_a_drained_node(slurm, tiny_run, datasets, tmp_path):
    plan = subprocess.run(command(tmp_path, datasets, "-n"), capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    planned = [rule for rule, _ in planned_job_wildcards(plan.stdout)]
    remote = [rule for rule in planned if rule not in LOCAL_RULES]
    assert FAULT_RULE in remote and "grads_pool_shard" in remote and "kmeans" in remote

    faults = Faults(slurm)
    faults.start()
    started = time.monotonic()
    proc = subprocess.run(
        command(
            tmp_path,
            datasets,
            "--workflow-profile",
            str(REPO / "profiles/slurm"),
            "--jobs",
            "4",
            "--slurm-init-seconds-before-status-checks",
            "1",
            "--seconds-between-status-checks",
            "2",
            "--verbose",
        ),
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    faults.stop.set()
    faults.join(timeout=10)
    wall = time.monotonic() - started
    log = proc.stdout + proc.stderr
    (tmp_path / "snakemake_slurm.log").write_text(log)
    assert proc.returncode == 0, log[-6000:] + slurm.logs()

    records = slurm.sacct()
    by_rule: dict[str, list[dict]] = {}
    for record in records:
        rule = re.match(r"rule_(\w+?)(?:_wildcards_|$)", record["Comment"])
        assert rule, record
        by_rule.setdefault(rule.group(1), []).append(record)
    # Every non-local rule of the plan ran as SLURM jobs, and only those.
    assert set(by_rule) == set(remote), (sorted(by_rule), sorted(remote))
    completed = [r for r in records if r["State"] == "COMPLETED"]
    assert sorted(re.match(r"rule_(\w+?)(?:_wildcards_|$)", r["Comment"]).group(1) for r in completed) == sorted(remote)
    # GPU rules asked for and got a GPU; CPU rules did not.
    for rule, jobs in by_rule.items():
        for job in jobs:
            if rule in GPU_RULES:
                assert "gres/gpu=1" in job["AllocTRES"] and "gres/gpu=1" in job["ReqTRES"], job
            else:
                assert "gres/gpu" not in job["AllocTRES"], job
    # The cancelled job is in SLURM's records, and its rule was run again to completion; the node was drained.
    assert faults.cancelled and faults.drained and faults.resumed
    cancelled = [r for r in records if r["JobID"] == faults.cancelled]
    assert cancelled and cancelled[0]["State"].startswith("CANCELLED"), cancelled
    assert any(r["State"] == "COMPLETED" and r["Comment"].startswith(f"rule_{FAULT_RULE}") for r in records)
    # The same selections as the local run.
    for target in TARGETS:
        ours = pq.read_table(tmp_path / target, columns=["example_id"]).column("example_id").to_pylist()
        local = pq.read_table(tiny_run / target, columns=["example_id"]).column("example_id").to_pylist()
        assert ours == local, target
    # Evidence for the README and the closing note.
    sbatch = sorted(
        {re.sub(r"--output \S+|--job-name \S+|/tmp/\S+", "", line).strip() for line in log.splitlines() if "sbatch call:" in line}
    )
    evidence = {"wall_s": round(wall, 1), "jobs": len(records), "sacct": records, "sbatch": sbatch, "cancelled": faults.cancelled}
    (tmp_path / "slurm_evidence.json").write_text(json.dumps(evidence, indent=1))
    print(json.dumps({k: v for k, v in evidence.items() if k != "sacct"}, indent=1))
    for record in records:
        print("|".join(record.values()))
