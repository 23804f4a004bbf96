"""Logging, progress bars and thread settings shared by every workflow stage."""

from __future__ import annotations

import logging
import os
import sys
import time
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


def progress(iterable: Iterable[T], desc: str, total: int | None = None, every_percent: float = 5.0, every_s: float = 60.0) -> Iterator[T]:
    """Iterate with a tqdm bar on a terminal, and a log line every ``every_percent`` of ``total`` (or every
    ``every_s`` seconds when the length is unknown or progress is slow) with the rate, for the rule's log."""
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    bar = tqdm(iterable, desc=desc, total=total, disable=None, mininterval=10.0, leave=False)
    return _logged(bar, desc, total, every_percent, every_s)


def _logged(items: Iterable[T], desc: str, total: int | None, every_percent: float, every_s: float) -> Iterator[T]:
    log = logging.getLogger("clusterucb.progress")
    start = last = time.perf_counter()
    done, next_percent = 0, every_percent
    for done, item in enumerate(items, start=1):
        yield item  # the consumer asked for the next item: this one is finished
        now = time.perf_counter()
        crossed = bool(total) and 100.0 * done >= next_percent * total
        if crossed or now - last >= every_s:
            rate = done / max(now - start, 1e-9)
            if total:
                log.info(
                    "%s: %d/%d (%.0f%%), %.3g/s, %.0f s elapsed, ~%.0f s left",
                    desc,
                    done,
                    total,
                    100.0 * done / total,
                    rate,
                    now - start,
                    (total - done) / rate,
                )
                while 100.0 * done >= next_percent * total:
                    next_percent += every_percent
            else:
                log.info("%s: %d done, %.3g/s, %.0f s elapsed", desc, done, rate, now - start)
            last = now


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads to the rule's ``threads`` (also makes CPU runs repeatable)."""
    import torch

    torch.set_num_threads(max(1, int(n)))
