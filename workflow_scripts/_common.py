"""Shared start of every workflow script: find the clusterucb package, log to the rule's log, pin threads."""

import logging
import os
import sys
from pathlib import Path


def init(snakemake):
    """Call first in a script run by Snakemake's ``script:`` directive."""
    repo = str(Path(snakemake.scriptdir).resolve().parent)
    if repo not in sys.path:  # works without `pip install -e .` (e.g. inside a --sdm conda env)
        sys.path.insert(0, repo)
    from clusterucb.infra.logsetup import set_threads, setup_logging

    setup_logging(snakemake.log[0])
    set_threads(snakemake.threads)


def finish():
    """Call last: end the script's process once its outputs are written, skipping the interpreter's teardown.

    With torch and transformers loaded, tearing the interpreter down takes ~1.5 s (measured on 2 cores: 1.6 s
    of a 7.5 s tiny-model job), paid by every job of the DAG. Everything the library writes is closed by then
    (temp name, then rename); the log is flushed here. Not reached when the script raises, so a failure keeps
    its exit status.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def model_dir(path):
    """The model directory behind a rule's ``model`` input (a weights file, or the directory itself)."""
    path = Path(path)
    return str(path if path.is_dir() else path.parent)


def named_inputs(snakemake) -> dict[str, list[str]]:
    """The rule's named inputs as lists of paths (a single file becomes a one-element list)."""
    out = {}
    for name in snakemake.input.keys():  # noqa: SIM118 (a Namedlist: `in` would test its values)
        value = getattr(snakemake.input, name)
        out[name] = [value] if isinstance(value, str) else list(value)
    return out


def throughput(snakemake, section: str) -> dict:
    """The throughput settings of a config section, read from the config rather than from params
    (clusterucb/infra/throughput.py: they change how work is batched, not its result)."""
    from clusterucb.infra.throughput import throughput_settings

    return throughput_settings(snakemake.config, section)
