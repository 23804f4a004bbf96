"""Running Snakemake on the tiny test config from the workflow tests, and reading what a dry run plans."""

from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "config" / "tiny.yaml"

# The tiny model's jobs are mostly interpreter start-up: two one-thread jobs at once beat one two-thread job.
CORES = ("--cores", "2", "--max-threads", "1")


def snakemake_cmd(workdir: Path, datasets: Path, *args: str, config: tuple[str, ...] = (), targets: tuple[str, ...] = ()) -> list[str]:
    # Targets go first: --configfile and --config take every value that follows them.
    return [
        sys.executable,
        "-m",
        "snakemake",
        *targets,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(TINY),
        "--config",
        f"datasets_dir={datasets}",
        *config,
        *args,
    ]


def rule_blocks() -> dict[str, str]:
    """Rule name -> the indented body of its definition, for every rule in rules/*.smk."""
    blocks = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        for match in re.finditer(r"^( *)rule (\w+):\n((?:\1 {4}.*\n|\s*\n)+)", text, re.MULTILINE):
            blocks[match.group(2)] = match.group(3)
    return blocks


# The whole tiny DAG (241 jobs) takes ~12 min on 2 cores: a job that loads the model spends ~8.5 s of CPU,
# nearly all of it importing torch, transformers and peft (2026-12-07). 40 min bounds a hang.
RUN_TIMEOUT_S = 2400


def run(
    workdir: Path, datasets: Path, *args: str, config: tuple[str, ...] = (), targets: tuple[str, ...] = (), check: bool = True
) -> subprocess.CompletedProcess:
    command = snakemake_cmd(workdir, datasets, *args, config=config, targets=targets)
    if "-n" in args:
        proc = DRY_RUNS.run(command)
    else:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


# A dry-run worker: imports Snakemake once, then forks a child for each command it reads on stdin (a JSON
# [argv, environment, working directory, stdout path, stderr path] line) and answers with the child's exit
# status. The child is Snakemake's own command line (snakemake.cli.main) in a fresh copy of the process, as
# `python -m snakemake` would run it.
DRY_RUN_WORKER = """
import importlib, json, os, sys, traceback
import snakemake.cli

# What a dry run imports after its command line is parsed (Snakemake's report, storage and profile code and what
# they use: ~370 modules); imported here once, not in every child. Our own package is not: each child reads it.
# A name a later Snakemake no longer uses is passed over: the child imports whatever it does use.
for name in ("snakemake.report", "snakemake.storage", "snakemake.profiles", "snakemake.assets", "requests", "nbformat",
             "docutils.core", "jinja2", "pygments.lexers", "jsonschema", "smart_open", "yte", "PIL.Image", "dpath"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass

for line in sys.stdin:
    argv, env, cwd, out, err = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.environ.clear()
            os.environ.update(env)  # the caller's, as a subprocess would inherit them
            os.chdir(cwd)
            sys.argv = [os.path.join(os.path.dirname(snakemake.cli.__file__), "__main__.py"), *argv]  # as `-m snakemake`
            snakemake.cli.main(argv)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class DryRuns:
    """Dry runs (``snakemake -n``) without a new interpreter each: on the finished tiny run a dry run takes
    4.3-4.7 s as ``python -m snakemake`` and 1.3-2.0 s forked from a worker that imported Snakemake (2 cores,
    2026-12-07), and the tests make over a hundred. Workers start on first use, one per concurrent caller up to
    ``workers``; each run is a fork of a worker, so no run sees another's state."""

    def __init__(self, workers: int):
        self.idle: queue.Queue = queue.Queue()
        for _ in range(workers):
            self.idle.put(None)  # a slot; its worker starts when first taken

    def run(self, command: list[str]) -> subprocess.CompletedProcess:
        assert command[:3] == [sys.executable, "-m", "snakemake"], command
        worker = self.idle.get()
        try:
            if worker is None or worker.poll() is not None:
                worker = subprocess.Popen(
                    [sys.executable, "-c", DRY_RUN_WORKER],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            with tempfile.TemporaryDirectory(prefix="dry-run-") as tmp:
                out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
                worker.stdin.write(json.dumps([command[3:], dict(os.environ), os.getcwd(), str(out), str(err)]) + "\n")
                worker.stdin.flush()
                ready, _, _ = select.select([worker.stdout], [], [], RUN_TIMEOUT_S)
                if not ready:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
                    raise subprocess.TimeoutExpired(command, RUN_TIMEOUT_S)
                answer = worker.stdout.readline()
                if not answer:
                    raise RuntimeError(f"the dry-run worker died (exit {worker.wait()}) running {command}")
                code = json.loads(answer)
                return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())
        finally:
            self.idle.put(worker)


DRY_RUNS = DryRuns(workers=4)


def planned_jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run ({} when nothing is to be done)."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match:
            break
        jobs[match.group(1)] = int(match.group(2))
    jobs.pop("total", None)
    return jobs


def planned_job_wildcards(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a dry run plans."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", output):
        header = re.match(r"(?:local)?rule (\w+):\n", block)
        if header:
            found = re.search(r"^\s+wildcards: (.*)$", block, re.MULTILINE)
            wildcards = dict(item.split("=", 1) for item in found.group(1).split(", ")) if found else {}
            jobs.append((header.group(1), wildcards))
    return jobs
