"""Gradient store (round trip, checksums, metadata), optimizer state by name, LR schedule and in-job resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinymodels import ragged_examples, tiny_lora_llama, train_killed_at_step

from clusterucb.features.gradients import PerSampleLoraGradients
from clusterucb.features.gradstore import GradientStore, merge_manifest, write_shard
from clusterucb.models.lora import adam_state_for, load_optimizer_state, save_optimizer_state
from clusterucb.training.schedule import linear_schedule, plan_steps, steps_per_epoch
from clusterucb.training.trainer import TrainSpec, train_lora

META = {
    "model": "m",
    "checkpoint": "warmup",
    "grad_type": "adam",
    "projector": "rademacher",
    "proj_dim": 8,
    "proj_seed": 0,
    "grad_dim": 100,
    "eps_inside_sqrt": True,
    "max_length": 64,
    "dtype": "float32",
}


def write_two_shards(tmp_path, meta2=None):
    g = torch.Generator().manual_seed(0)
    paths = []
    for shard, ids in enumerate([["a", "b", "c"], ["d", "e"]]):
        feats = torch.nn.functional.normalize(torch.randn(len(ids), 8, generator=g), dim=1)
        failures = {1: "no target token"} if shard == 0 else {}
        if failures:
            feats[1] = float("nan")
        tensors, index = tmp_path / f"shard-{shard}.safetensors", tmp_path / f"shard-{shard}.parquet"
        write_shard(
            tensors,
            index,
            shard,
            ids,
            feats,
            torch.arange(len(ids), dtype=torch.float32),
            failures,
            meta2 if (meta2 and shard == 1) else META,
        )
        paths.append((tensors, index, feats))
    return paths


def test_store_round_trip_keeps_failures_out(tmp_path):
    shards = write_two_shards(tmp_path)
    merge_manifest([(t, i) for t, i, _ in shards], tmp_path / "manifest.parquet")
    store = GradientStore(tmp_path / "manifest.parquet", expect={"proj_dim": 8, "checkpoint": "warmup"})
    ids, feats = store.load()
    assert ids == ["a", "c", "d", "e"]
    assert store.failures() == {"b": "no target token"}
    expected = torch.cat([shards[0][2][[0, 2]], shards[1][2]])
    assert torch.equal(feats, expected)


def test_store_refuses_changed_shard_and_wrong_metadata(tmp_path):
    shards = write_two_shards(tmp_path)
    merge_manifest([(t, i) for t, i, _ in shards], tmp_path / "manifest.parquet")
    with pytest.raises(ValueError, match="proj_dim"):
        GradientStore(tmp_path / "manifest.parquet", expect={"proj_dim": 16})
    with pytest.raises(ValueError, match="checkpoint"):
        GradientStore(tmp_path / "manifest.parquet", expect={"checkpoint": "runs/clusterucb/epoch-1"})
    # Rewrite shard 1 with other values: its checksum no longer matches the manifest.
    t, i, feats = shards[1]
    write_shard(t, i, 1, ["d", "e"], feats.flip(0), torch.zeros(2), {}, META)
    with pytest.raises(ValueError, match="checksum"):
        GradientStore(tmp_path / "manifest.parquet")


def test_merge_refuses_shards_from_different_feature_spaces(tmp_path):
    shards = write_two_shards(tmp_path, meta2={**META, "proj_seed": 1})
    with pytest.raises(ValueError, match="proj_seed"):
        merge_manifest([(t, i) for t, i, _ in shards], tmp_path / "manifest.parquet")


def test_write_shard_refuses_unrecorded_nan_rows(tmp_path):
    feats = torch.ones(2, 8)
    feats[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        write_shard(tmp_path / "s.safetensors", tmp_path / "s.parquet", 0, ["a", "b"], feats, torch.zeros(2), {}, META)


def test_linear_schedule_and_steps():
    assert linear_schedule(0, 100, 10) == 0.0
    assert linear_schedule(5, 100, 10) == 0.5
    assert linear_schedule(10, 100, 10) == 1.0
    assert linear_schedule(55, 100, 10) == pytest.approx(0.5)
    assert steps_per_epoch(20_400, 128) == 159  # the official 159 steps per epoch
    assert plan_steps(159, 159, 636, 0.03).warmup_steps == 20  # the official W = ceil(0.03 * 636)
    with pytest.raises(ValueError):
        steps_per_epoch(10, 16)


def _train(model, examples, n_steps, scratch=None, resume=None, start=0):
    spec = TrainSpec(lr=1e-2, effective_batch=4, micro_batch=2)
    return train_lora(
        model, examples, spec, plan_steps(start, n_steps, 8, 0.1), 0, [1, 2], resume_from=resume, scratch_dir=scratch, save_every=1
    )


def test_optimizer_state_round_trips_by_name_in_gradient_order(tmp_path):
    model = tiny_lora_llama()
    ckpt, steps = _train(model, ragged_examples(8), 2)
    assert [s["global_step"] for s in steps] == [1, 2] and steps[1]["lr"] > steps[0]["lr"] == 0.0
    save_optimizer_state(ckpt, tmp_path / "opt.safetensors", {"checkpoint": "x"})
    loaded = load_optimizer_state(tmp_path / "opt.safetensors")
    assert loaded.hyper["betas"] == [0.9, 0.999] and loaded.hyper["global_step"] == 2
    state = adam_state_for(model, loaded)
    names = PerSampleLoraGradients(model).names
    assert state.exp_avg.numel() == PerSampleLoraGradients(model).dim
    first = names[0]
    assert torch.equal(state.exp_avg[: loaded.exp_avg[first].numel()], loaded.exp_avg[first].flatten())
    assert state.exp_avg_sq.min() >= 0 and state.exp_avg.abs().sum() > 0


def test_training_killed_mid_job_resumes_from_scratch_to_the_same_weights(tmp_path, monkeypatch):
    examples = ragged_examples(10, seed=6)
    reference = tiny_lora_llama(seed=2)
    _train(reference, examples, 5)

    import clusterucb.training.trainer as training

    train_killed_at_step(monkeypatch, 3, lambda: _train(tiny_lora_llama(seed=2), examples, 5, scratch=tmp_path / "scratch"))
    assert (tmp_path / "scratch" / "state.json").exists()
    original = training.linear_schedule

    resumed = tiny_lora_llama(seed=2)  # a fresh process: weights come from the scratch state
    torch.manual_seed(12345)  # and whatever the RNGs hold there: the scratch state restores them
    counted = {"n": 0}

    def counting(step, total, warmup):
        counted["n"] += 1
        return original(step, total, warmup)

    monkeypatch.setattr(training, "linear_schedule", counting)
    _, steps = _train(resumed, examples, 5, scratch=tmp_path / "scratch")
    assert counted["n"] == 2  # only steps 4 and 5 were run again ...
    assert [s["global_step"] for s in steps] == [1, 2, 3, 4, 5]  # ... and the log still has every step
    assert not (tmp_path / "scratch").exists()  # cleared once the job's outputs are complete
    for (name, a), (_, b) in zip(reference.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name  # dropout masks included: bit for bit


def test_a_scratch_state_left_by_another_starting_adapter_is_not_resumed(tmp_path, monkeypatch):
    """Same training settings and examples, another LoRA initialisation: the killed job's state is not resumed."""
    examples = ragged_examples(10, seed=6)
    train_killed_at_step(monkeypatch, 3, lambda: _train(tiny_lora_llama(seed=2), examples, 5, scratch=tmp_path / "scratch"))
    assert (tmp_path / "scratch" / "state.json").exists()

    reference = tiny_lora_llama(seed=4)
    _train(reference, examples, 5)
    other_start = tiny_lora_llama(seed=4)
    _, steps = _train(other_start, examples, 5, scratch=tmp_path / "scratch")
    assert [s["global_step"] for s in steps] == [1, 2, 3, 4, 5]
    for (name, a), (_, b) in zip(reference.named_parameters(), other_start.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name  # trained from its own start, not from the other job's step 2


def test_resuming_the_previous_epoch_continues_adam(tmp_path):
    examples = ragged_examples(8, seed=7)
    model = tiny_lora_llama(seed=3)
    ckpt, _ = _train(model, examples, 2)
    ckpt2, _ = _train(model, examples, 2, resume=ckpt, start=2)
    name = next(iter(ckpt2.step))
    assert ckpt2.step[name] == 4.0 and ckpt2.hyper["global_step"] == 4


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shards_are_memory_mapped_in_their_storage_dtype(tmp_path, dtype):
    from clusterucb.features.gradstore import mmap_tensor

    feats = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    write_shard(tmp_path / "s.safetensors", tmp_path / "s.parquet", 0, list("abcdef"), feats, torch.zeros(6), {}, {**META, "dtype": dtype})
    merge_manifest([(tmp_path / "s.safetensors", tmp_path / "s.parquet")], tmp_path / "manifest.parquet")
    [(ids, mapped)] = GradientStore(tmp_path / "manifest.parquet").shard_features()
    assert ids == list("abcdef") and mapped.dtype == getattr(torch, dtype)
    assert mmap_tensor(tmp_path / "s.safetensors").shape == (6, 8)
    tolerance = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    assert torch.allclose(mapped.float(), feats, atol=tolerance)


def test_kmeans_streams_over_shards_like_one_matrix():
    from clusterucb.selection.kmeans import spherical_kmeans

    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    whole = spherical_kmeans(x, 5, seed=1)
    streamed = spherical_kmeans([x[:120], x[120:250].half(), x[250:]], 5, seed=1, chunk=50)
    agreement = (whole.labels == streamed.labels).float().mean()
    assert agreement > 0.97  # fp16 storage of one block may flip a few near-ties
    exact = spherical_kmeans([x[:120], x[120:]], 5, seed=1, chunk=50)
    assert torch.equal(whole.labels, exact.labels)


def test_rng_state_round_trips_through_json():
    import json
    import random

    import numpy as np

    from clusterucb.training.trainer import capture_rng_state, restore_rng_state

    state = json.loads(json.dumps(capture_rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_less_weights_come_from_the_schedule_even_when_the_log_lost_rows(tmp_path):
    import pyarrow as pa

    from clusterucb.infra.io import write_parquet
    from clusterucb.pipeline.select import less_weights
    from clusterucb.training.schedule import mean_lr_per_epoch

    lr, per_epoch, epochs, ratio = 2e-5, 5, 4, 0.03
    total, warmup = per_epoch * epochs, plan_steps(0, per_epoch, per_epoch * epochs, ratio).warmup_steps
    rows = [
        {"epoch": s // per_epoch + 1, "global_step": s + 1, "lr": lr * linear_schedule(s, total, warmup), "loss": 1.0} for s in range(total)
    ]
    means = mean_lr_per_epoch(lr, per_epoch, epochs, ratio)
    assert np.allclose(means, [np.mean([r["lr"] for r in rows if r["epoch"] == e]) for e in range(1, epochs + 1)])
    meta = {"epochs": epochs, "schedule": {"lr": lr, "steps_per_epoch": per_epoch, "warmup_ratio": ratio}}
    schema = pa.schema(
        [pa.field("epoch", pa.int32()), pa.field("global_step", pa.int32()), pa.field("lr", pa.float64()), pa.field("loss", pa.float32())]
    )
    write_parquet(pa.Table.from_pylist(rows, schema=schema), tmp_path / "full.parquet", meta)
    write_parquet(pa.Table.from_pylist(rows[3:], schema=schema), tmp_path / "cut.parquet", meta)  # a log that lost its first steps
    assert np.allclose(less_weights(str(tmp_path / "full.parquet")), means / means.sum())
    assert np.allclose(less_weights(str(tmp_path / "cut.parquet")), means / means.sum())
    # A log that contradicts its schedule is refused.
    wrong = [{**r, "lr": r["lr"] * 2} for r in rows]
    write_parquet(pa.Table.from_pylist(wrong, schema=schema), tmp_path / "wrong.parquet", meta)
    with pytest.raises(ValueError, match="differ from the schedule"):
        less_weights(str(tmp_path / "wrong.parquet"))
