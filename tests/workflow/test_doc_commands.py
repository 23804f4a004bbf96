"""Every Snakemake command the documentation shows, dry-run, so that a renamed key, rule, target or file breaks CI
and not a user.

Commands are the ``snakemake …`` (and ``clusterucb-plan …``) commands of the fenced bash/sh blocks of README.md,
docs/*.md, CONTRIBUTING.md and benchmarks/README.md (continuation lines joined, the block's shell variable
assignments kept), and the inline code spans that start with ``snakemake``. Each runs through ``bash -c`` as the
reader would type it, with ``snakemake`` standing for ``python -m snakemake -n --snakefile <repo>/Snakefile``, in
a fresh directory that looks like a clone to the command: ``configs/`` and ``profiles/`` linked from the repository,
``mine.yaml`` and its pool written from the README's own blocks, the staged datasets mirror in place of
``../shared/datasets`` and of any other ``datasets_dir=`` value. ``--report <file>`` needs a finished run, so it is
left out of the dry run (the rest of the command still is checked).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from dag import REPO

pytestmark = pytest.mark.workflow

DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:^|(?<=[\s;&|(]))(snakemake|clusterucb-plan)(?=\s|$)")
ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?[A-Za-z_]\w*=\S*\s*$")


@dataclass(frozen=True)
class DocCommand:
    source: str  # file:line
    command: str  # the command as the reader sees it (continuations joined)
    setup: tuple[str, ...] = ()  # the block's variable assignments before it

    def __str__(self) -> str:
        return f"{self.source}: {self.command}"


def logical_lines(block: str) -> list[tuple[int, str]]:
    """(offset of the first line, the line with its backslash continuations joined)."""
    out, current, start = [], "", 0
    for i, line in enumerate(block.splitlines()):
        if not current:
            start = i
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append((start, current + line))
        current = ""
    if current:
        out.append((start, current))
    return out


def command_segment(line: str) -> str | None:
    """The snakemake / clusterucb-plan command of a shell line: from its name to the next ``&&``, ``||``, ``;``
    or ``|`` outside quotes and ``$(…)``; a trailing comment dropped."""
    match = COMMAND.search(line)
    if not match:
        return None
    text = line[match.start() :]
    out, depth, quote = [], 0, None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif text.startswith("$(", i):
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif depth == 0 and (ch in ";|" or text.startswith("&&", i)) or depth == 0 and ch == "#" and (i == 0 or text[i - 1].isspace()):
            break
        out.append(ch)
        i += 1
    return "".join(out).strip()


def doc_commands(paths: list[Path] = DOCS) -> list[DocCommand]:
    commands = []
    for path in paths:
        if not path.exists():
            continue
        text = path.read_text()
        name = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
        for block in re.finditer(r"^```(bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
            first_line = text[: block.start()].count("\n") + 2
            setup: list[str] = []
            for offset, line in logical_lines(block.group(2)):
                if ASSIGNMENT.match(line):
                    setup.append(line.strip())
                    continue
                segment = command_segment(line)
                if segment:
                    commands.append(DocCommand(f"{name}:{first_line + offset}", segment, tuple(setup)))
        fenced = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
        for span in re.finditer(r"`(snakemake [^`]+)`", fenced):
            commands.append(DocCommand(f"{name}:{fenced[: span.start()].count(chr(10)) + 1}", " ".join(span.group(1).split())))
    return commands


def readme_block(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert match, f"README.md has no block after <!-- {marker} -->"
    return match.group(1)


def user_files(workdir: Path) -> None:
    """What a reader following the README has beside the clone: the pool and mine.yaml of its own blocks."""
    (workdir / "pool").mkdir()
    pool = workdir / "pool" / "mine.jsonl"
    pool.write_text(readme_block("pool-example"))
    for line in pool.read_text().splitlines():
        json.loads(line)
    (workdir / "mine.yaml").write_text(readme_block("user-overlay").replace("/abs/path/mine.jsonl", str(pool)))
    for name in ("configs", "profiles", "tests"):
        (workdir / name).symlink_to(REPO / name, target_is_directory=True)


def shell_script(command: DocCommand, mirror: Path) -> str:
    """The bash script that dry-runs ``command`` as written, with the mirror for the datasets."""
    text = "\n".join([*command.setup, command.command])
    text = text.replace("../shared/datasets", str(mirror))
    text = re.sub(r"datasets_dir=(?!\$)[^\s'\"]+", f"datasets_dir={mirror}", text)
    text = re.sub(r"\s--report\s+\S+", " ", text)
    python = shlex.quote(sys.executable)
    snakefile = shlex.quote(str(REPO / "Snakefile"))
    functions = (
        f'snakemake() {{ {python} -m snakemake -n --snakefile {snakefile} "$@"; }}\n'
        f'clusterucb-plan() {{ {python} -m clusterucb.infra.plan "$@"; }}\n'
        f'python() {{ {python} "$@"; }}\n'
    )
    return "set -eo pipefail\n" + functions + text + "\n"


def dry_run(command: DocCommand, mirror: Path, workdir: Path) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True)
    user_files(workdir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run(["bash", "-c", shell_script(command, mirror)], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def test_the_documentation_shows_the_commands_a_user_needs():
    commands = [c.command for c in doc_commands()]
    assert len(commands) >= 15, commands
    for wanted in (
        "--configfile mine.yaml",
        "--workflow-profile profiles/slurm",
        "--resources gpu=",
        "--rerun-incomplete",
        "configs/sweep.yaml",
    ):
        assert any(wanted in c for c in commands), f"no documented command uses {wanted}"


def test_extraction_follows_the_shell(tmp_path):
    block = "D=datasets_dir=x\nsnakemake --cores 2 \\\n    --config $D a=1  # a comment\npip install . && snakemake -n -- {a,b}.txt; echo done\n"
    path = tmp_path / "example.md"
    path.write_text(f"Run it:\n\n```bash\n{block}```\n\nor `snakemake --unlock`.\n\n```python\nsnakemake = 1\n```\n")
    found = doc_commands([path])
    assert [(" ".join(c.command.split()), c.setup) for c in found] == [
        ("snakemake --cores 2 --config $D a=1", ("D=datasets_dir=x",)),
        ("snakemake -n -- {a,b}.txt", ("D=datasets_dir=x",)),
        ("snakemake --unlock", ()),
    ]
    script = shell_script(found[0], Path("/m"))
    assert "D=datasets_dir=/m\n" in script and script.rstrip().endswith("--config $D a=1")


def test_every_documented_command_dry_runs(datasets, tmp_path):
    unique: dict[tuple, DocCommand] = {}
    for command in doc_commands():  # the same command shown in two places is run once
        unique.setdefault((command.setup, " ".join(command.command.split())), command)
    commands = list(unique.values())

    def check(indexed):
        index, command = indexed
        proc = dry_run(command, datasets, tmp_path / f"cmd-{index}")
        return command, proc

    # Four at a time even on 2 cores: a dry run waits on its start-up's file reads as much as it computes.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(check, enumerate(commands)))
    failures = [
        f"{command}\n  exit {proc.returncode}: {(proc.stdout[-1500:] + proc.stderr[-2500:]).strip()}"
        for command, proc in results
        if proc.returncode != 0
    ]
    assert not failures, "documented commands that do not dry-run:\n\n" + "\n\n".join(failures)


def test_a_command_with_a_wrong_key_fails_its_dry_run(datasets, tmp_path):
    command = DocCommand("example", "snakemake --cores 2 --config datasets_dir=../shared/datasets selection='{betta: 2.0}'")
    proc = dry_run(command, datasets, tmp_path / "wrong")
    assert proc.returncode != 0 and "betta" in proc.stdout + proc.stderr
