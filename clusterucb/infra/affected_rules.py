"""Which rules a library edit affects: ``snakemake --forcerun $(python -m clusterucb.infra.affected_rules)``.

Snakemake tracks a rule's own script, not the library modules it imports, so an edit to ``clusterucb/``
reruns nothing by itself. This reads each rule's ``script:`` and follows its imports statically (lazy
imports inside functions included) through the package; a package that discovers its modules at run
time (``pkgutil``) depends on all of them, and a module that runs a sibling ``.py`` file by name depends on
it. Changed files come from ``git diff`` against ``--since`` (default HEAD: uncommitted edits) or are
given as arguments. Forcing those rules makes Snakemake rerun everything downstream of them.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "clusterucb"
RULE_SCRIPT = re.compile(r"^rule (\w+):\n((?: {4}.*\n|\s*\n)+)", re.MULTILINE)
SCRIPT_PATH = re.compile(r"script:\s*\n\s*\"\.\./(workflow_scripts/\w+\.py)\"")


def rule_scripts(repo: Path = REPO) -> dict[str, Path]:
    """rule name -> the script it runs, from ``rules/*.smk``."""
    out = {}
    for smk in sorted((repo / "rules").glob("*.smk")):
        for name, body in RULE_SCRIPT.findall(smk.read_text()):
            script = SCRIPT_PATH.search(body)
            if script:
                out[name] = repo / script.group(1)
    return out


def _module_file(name: str, repo: Path) -> Path | None:
    base = repo.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _direct_dependencies(path: Path, repo: Path) -> frozenset[Path]:
    text = path.read_text()
    tree = ast.parse(text)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    deps = set()
    for name in names:
        if name == "_common":  # the scripts' shared start
            deps.add(repo / "workflow_scripts" / "_common.py")
        elif name.split(".")[0] == PACKAGE:
            parts = name.split(".")
            for i in range(2, len(parts) + 1):  # importing a.b.c runs a/b/__init__ too
                found = _module_file(".".join(parts[:i]), repo)
                if found:
                    deps.add(found)
    if path.name == "__init__.py" and "pkgutil" in text:  # modules discovered at run time
        deps |= {p for p in path.parent.glob("*.py") if p != path}
    for node in ast.walk(tree):  # a sibling program run by file name (the sandbox's bootstrap)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
            sibling = path.parent / node.value
            if sibling.is_file():
                deps.add(sibling)
    deps.discard(path)
    return frozenset(deps)


def dependencies(script: Path, repo: Path = REPO) -> set[Path]:
    """The script and every repository file it imports, transitively."""
    seen, todo = {script}, [script]
    while todo:
        for dep in _direct_dependencies(todo.pop(), repo):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def affected_rules(changed: list[Path], repo: Path = REPO) -> list[str]:
    changed_set = {p.resolve() for p in changed}
    return sorted(rule for rule, script in rule_scripts(repo).items() if {p.resolve() for p in dependencies(script, repo)} & changed_set)


def changed_files(since: str, repo: Path = REPO) -> list[Path]:
    """Library and script files that differ from ``since`` (committed or not), and untracked ones."""
    paths = [PACKAGE, "workflow_scripts"]
    diff = subprocess.run(["git", "diff", "--name-only", since, "--", *paths], cwd=repo, capture_output=True, text=True, check=True).stdout
    new = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "--", *paths], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    return [repo / line for line in (diff + new).splitlines() if line.endswith(".py")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterucb.infra.affected_rules", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="changed files (default: from git diff against --since)")
    parser.add_argument("--since", default="HEAD", help="git revision to compare with (default: HEAD, i.e. uncommitted edits)")
    args = parser.parse_args(argv)
    changed = args.files or changed_files(args.since)
    rules = affected_rules(changed)
    print(" ".join(rules))
    if changed and not rules:
        print(f"no rule imports {', '.join(str(p) for p in changed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
