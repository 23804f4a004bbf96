"""benchmarks/peers.py, the pure logic behind benchmarks/gradients.py's peer rows and its like-for-like headlines:
which peer configuration a ratio is taken against, the fixed cost per batch, bergson's batching, configuration
parsing and the summary line. No peer is needed (the module is standard library only); one test runs gradients.py
on the tiny model."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_peers", REPO / "benchmarks" / "peers.py")
peers = sys.modules["bench_peers"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(peers)


def test_the_fastest_configuration_within_the_tolerance_is_picked():
    rates = {"global/b16": 0.02, "per_module/tokens": 1.4, "per_module/b4": 0.9}
    spearman = {"global/b16": 0.93, "per_module/tokens": 0.80, "per_module/b4": 0.80}
    # per_module is faster but 0.12 below ours: the like-for-like reference is global
    assert peers.pick_reference(rates, spearman, ours=0.92) == ("global/b16", "qualified")
    # within 0.02 below ours counts as equal agreement; just outside it does not
    assert peers.pick_reference(rates, spearman, ours=0.819) == ("per_module/tokens", "qualified")
    assert peers.pick_reference(rates, spearman, ours=0.821)[0] == "global/b16"
    # a better agreement than ours qualifies too
    assert peers.pick_reference(rates, {k: 0.99 for k in rates}, ours=0.5) == ("per_module/tokens", "qualified")


def test_without_a_qualifying_configuration_the_closest_in_agreement_is_picked():
    rates = {"a": 5.0, "b": 1.0, "c": 3.0}
    assert peers.pick_reference(rates, {"a": 0.5, "b": 0.7, "c": 0.6}, ours=0.95) == ("b", "none-qualified")
    # equal agreement: the faster of the two
    assert peers.pick_reference(rates, {"a": 0.7, "b": 0.7, "c": 0.6}, ours=0.95) == ("a", "none-qualified")


def test_unmeasured_agreement_falls_back_to_the_fastest_a_lower_bound():
    rates = {"slow": 1.0, "fast": 4.0}
    assert peers.pick_reference(rates, {"slow": 0.99, "fast": 0.5}, ours=None) == ("fast", "unmeasured")
    assert peers.pick_reference(rates, {"slow": 0.99}, ours=0.9) == ("fast", "unmeasured")  # one configuration unscored
    assert peers.pick_reference(rates, {"slow": 0.99, "fast": math.nan}, ours=0.9) == ("fast", "unmeasured")
    with pytest.raises(ValueError):
        peers.pick_reference({}, {}, ours=0.9)


def test_fixed_cost_is_the_intercept_of_seconds_against_tokens():
    # 870 s of matrix generation per batch plus 2 ms per padded token
    tokens = [2048, 1024, 512, 2000]
    seconds = [870 + 0.002 * t for t in tokens]
    fixed, per_token = peers.fixed_cost(tokens, seconds)
    assert fixed == pytest.approx(870) and per_token == pytest.approx(0.002)
    fixed, per_token = peers.fixed_cost([100, 200, 300], [0.5, 1.0, 1.5])  # no fixed part
    assert abs(fixed) < 1e-12 and per_token == pytest.approx(0.005)
    assert all(math.isnan(x) for x in peers.fixed_cost([512, 512], [1.0, 1.1]))  # one token count: no line
    with pytest.raises(ValueError):
        peers.fixed_cost([1, 2], [1.0])


def test_token_batches_pack_as_bergson_does():
    lengths = [100, 300, 250, 50, 1, 200]
    # longest first; a batch grows while longest * size <= budget; the 1-token example is left out
    assert peers.token_batches(lengths, budget=600) == [[1, 2], [5, 0, 3]]
    assert peers.token_batches(lengths, budget=10_000, cap=2) == [[1, 2], [5, 0], [3]]
    # a fixed batch size: bergson's max_batch_size with a budget of size x the longest
    assert [len(b) for b in peers.token_batches(lengths, budget=4 * 300, cap=4)] == [4, 1]
    with pytest.raises(ValueError, match="does not fit"):
        peers.token_batches([3000], budget=2048)


def test_configs_parse_in_order_without_repeats_and_refuse_unknowns():
    configs = peers.parse_configs("global:tokens, per_module:8,global:tokens,per_module:08", ("global", "per_module"))
    assert [c.name for c in configs] == ["global/tokens", "per_module/b8"]
    assert configs[0].batch_size is None and configs[1].batch_size == 8
    for bad in ("global", "dense:8", "global:0", "global:-4", "global:many", ""):
        with pytest.raises(ValueError):
            peers.parse_configs(bad, ("global", "per_module"))


def test_timing_and_ratio_and_the_summary_line():
    assert peers.timing([3.0, 1.0, 2.0, 10.0]) == (1.0, 2.5)
    with pytest.raises(ValueError):
        peers.timing([])
    assert peers.ratio(3.0, 1.5) == 2.0
    assert math.isnan(peers.ratio(3.0, None)) and math.isnan(peers.ratio(3.0, 0.0)) and math.isnan(peers.ratio(math.nan, 1.0))
    line = peers.last_line({"speedup_vs_less": 131.555, "floor_fraction": 0.8374, "cosine_min": 0.9999999, "sparse_vs_sparse": math.nan})
    assert line == "speedup_vs_less=131.56 floor_fraction=0.837 cosine_min=1.000000 sparse_vs_sparse=nan"


def test_dense_agreement_by_reference_equals_the_dense_row(datasets, tmp_path):
    """On a large LoRA (c-dense) is not run (its matrix is regenerated every batch) and its agreement comes from our
    dense projector applied to the exact LESS-transformed gradients: the same features, so the same agreement as the
    row itself (a tiny model, 16 samples, both ways)."""
    import json
    import subprocess

    def agreement(rows: str) -> dict:
        out = tmp_path / f"{rows}.json"
        command = [sys.executable, str(REPO / "benchmarks" / "gradients.py"), "--samples", "16", "--val", "4"]
        command += ["--rows", rows, "--threads", "1", "--agreement", "yes", "--quality", "no", "--repeats", "1"]
        command += ["--datasets", str(datasets), "--save-agreement", str(out)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())

    by_row, by_reference = agreement("c-dense"), agreement("c")
    assert set(by_reference) == {"c", "c-dense"}
    assert by_reference["c-dense"]["spearman"] == pytest.approx(by_row["c-dense"]["spearman"], abs=1e-9)
    assert by_reference["c-dense"]["overlap"] == by_row["c-dense"]["overlap"]


def test_bergsons_generation_rate_is_timed_by_its_script_and_a_failure_is_a_reason(tmp_path, monkeypatch):
    """gradients.py estimates a (d) global row from bergson's matrix generation timed on the machine
    (benchmarks/bergson_rate.py in bergson's venv): the rate is read from the script's line, and a python that
    cannot run it gives the reason (the row is then left out with it), never a rate assumed from another machine."""
    import torch

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_gradients", REPO / "benchmarks" / "gradients.py")
    gradients = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gradients)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'bergson generating'\necho bergson_rademacher_entries_per_s=1.5e+08\n")
    fake.chmod(0o755)
    assert gradients.bergson_generation_rate(fake, 8192, torch.device("cpu")) == (1.5e8, None)
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'bergson'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    rate, reason = gradients.bergson_generation_rate(broken, 8192, torch.device("cpu"))
    assert math.isnan(rate) and reason == "bergson_rate.py exited 1: ModuleNotFoundError: No module named 'bergson'"
