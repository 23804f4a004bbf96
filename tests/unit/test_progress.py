"""Long loops report to the rule's log, not only to a terminal bar."""

from __future__ import annotations

import logging

from clusterucb.infra.logsetup import progress


def test_progress_logs_every_few_percent_with_a_rate(caplog):
    with caplog.at_level(logging.INFO, logger="clusterucb.progress"):
        assert list(progress(range(100), desc="score", every_percent=10.0)) == list(range(100))
    lines = [r.getMessage() for r in caplog.records if r.name == "clusterucb.progress"]
    assert len(lines) == 10
    assert lines[0].startswith("score: 10/100 (10%), ") and "/s" in lines[0] and lines[-1].startswith("score: 100/100 (100%)")


def test_progress_without_a_length_logs_by_time(caplog):
    with caplog.at_level(logging.INFO, logger="clusterucb.progress"):
        assert sum(progress((i for i in range(3)), desc="draws", every_s=0.0)) == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "clusterucb.progress"]
    assert lines == [line for line in lines if line.startswith("draws: ")] and len(lines) == 3 and "done" in lines[0]
