"""Logging, progress bars and thread settings shared by every workflow stage."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_path: str | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send library logs (and warnings) to ``log_path``, or stderr when None.

    Snakemake does not redirect anything itself, so each script calls this
    first with the rule's ``log:`` file.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_path, mode="w")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    if log_path:
        _log_uncaught_exceptions()
    return logging.getLogger("clusterucb")


def _log_uncaught_exceptions() -> None:
    """Put a job's fatal traceback in its log file too (Snakemake shows the log of a failed job)."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        logging.getLogger("clusterucb").critical("job failed", exc_info=(kind, value, traceback))
        previous(kind, value, traceback)

    sys.excepthook = hook


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar that stays quiet when stderr is not a terminal (i.e. in logs)."""
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, disable=None, mininterval=10.0, leave=False))


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads to the rule's ``threads`` (also makes CPU runs repeatable)."""
    import torch

    torch.set_num_threads(max(1, int(n)))
