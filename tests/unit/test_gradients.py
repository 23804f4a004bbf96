"""Per-sample LoRA gradients: exactness against a batch-1 backward loop, Adam transform, failures."""

from __future__ import annotations

import math

import pytest
import torch
from tinymodels import loop_gradients, ragged_examples, tiny_lora_llama

from clusterucb.data.tokenize import IGNORE_INDEX
from clusterucb.features.gradients import (
    AdamPreconditioner,
    AdamState,
    GradientFeaturizer,
    PerSampleLoraGradients,
    length_batches,
    pad_batch,
)
from clusterucb.features.projection import RademacherProjector


def test_batched_per_sample_gradients_equal_batch1_loop():
    model = tiny_lora_llama()
    examples = ragged_examples(7)
    reference = loop_gradients(model, examples)
    grads, losses = PerSampleLoraGradients(model)(*pad_batch(examples, 0, "cpu"))
    assert grads.shape == reference.shape
    rel = (grads - reference).norm(dim=1) / reference.norm(dim=1)
    assert float(rel.max()) < 1e-5, rel
    # Both LoRA factors carry signal (not a trivially zero comparison).
    assert reference.abs().sum() > 0 and torch.isfinite(losses).all()


def test_gradient_order_is_named_parameters_order():
    model = tiny_lora_llama()
    per_sample = PerSampleLoraGradients(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert per_sample.names == names
    assert per_sample.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_refuses_non_lora_trainable_parameters():
    model = tiny_lora_llama()
    model.base_model.model.lm_head.weight.requires_grad_(True)
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="unsupported trainable parameter"):
        PerSampleLoraGradients(model)


def test_adam_preconditioner_matches_hand_computation():
    m, v, g = [0.5, -0.2, 0.0], [0.04, 0.01, 1e-6], [1.0, 0.3, -2.0]
    b1, b2, eps = 0.9, 0.999, 1e-8
    state = AdamState(torch.tensor(m, dtype=torch.float64), torch.tensor(v, dtype=torch.float64), b1, b2, eps)
    grads = torch.tensor([g], dtype=torch.float64)
    faithful = AdamPreconditioner(state, eps_inside_sqrt=True)(grads)[0].tolist()
    textbook = AdamPreconditioner(state, eps_inside_sqrt=False)(grads)[0].tolist()
    for k in range(3):
        m_new = b1 * m[k] + (1 - b1) * g[k]
        v_new = b2 * v[k] + (1 - b2) * g[k] ** 2
        assert faithful[k] == pytest.approx(m_new / math.sqrt(v_new + eps), rel=1e-12)
        assert textbook[k] == pytest.approx(m_new / (math.sqrt(v_new) + eps), rel=1e-12)
    assert faithful[0] == pytest.approx(0.55 / math.sqrt(0.03996 + 0.001 + 1e-8), rel=1e-12)


def test_featurizer_is_batch_size_invariant_and_unit_norm():
    model = tiny_lora_llama()
    examples = ragged_examples(9, seed=3)
    dim = PerSampleLoraGradients(model).dim
    one = GradientFeaturizer(model, 0, RademacherProjector(dim, 64, seed=5), max_batch_size=1).featurize(examples)
    many = GradientFeaturizer(model, 0, RademacherProjector(dim, 64, seed=5), max_batch_size=4, max_batch_tokens=10_000).featurize(examples)
    assert torch.allclose(one.features, many.features, atol=1e-5)
    assert torch.allclose(many.features.norm(dim=1), torch.ones(len(examples)), atol=1e-5)
    assert not one.failures and not many.failures


def test_sample_without_target_tokens_is_a_recorded_failure_not_a_zero_vector():
    model = tiny_lora_llama()
    examples = ragged_examples(3)
    examples[1] = {**examples[1], "labels": [IGNORE_INDEX] * len(examples[1]["input_ids"])}
    dim = PerSampleLoraGradients(model).dim
    result = GradientFeaturizer(model, 0, RademacherProjector(dim, 32, seed=0), max_batch_size=4).featurize(examples)
    assert result.failures == {1: "no target token"}
    assert torch.isnan(result.features[1]).all()
    assert torch.isfinite(result.features[[0, 2]]).all()


def test_length_batches_respect_limits_and_cover_everything():
    lengths = [5, 50, 7, 49, 3, 100, 8, 8]
    batches = length_batches(lengths, max_batch_size=3, max_batch_tokens=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 120


def test_killed_shard_resumes_without_recomputing_finished_samples(tmp_path):
    from clusterucb.features.gradients import featurize_resumable

    model = tiny_lora_llama()
    examples = ragged_examples(10, seed=8)
    dim = PerSampleLoraGradients(model).dim
    featurizer = GradientFeaturizer(model, 0, RademacherProjector(dim, 32, seed=0), max_batch_size=4)
    reference = featurizer.featurize(examples)

    computed = []
    original = featurizer.featurize

    def dying(batch, desc=""):
        if len(computed) == 2:
            raise KeyboardInterrupt("killed during the third part")
        computed.append([e["example_id"] for e in batch])
        return original(batch, desc)

    featurizer.featurize = dying
    with pytest.raises(KeyboardInterrupt):
        featurize_resumable(featurizer, examples, tmp_path, key="k1", chunk_size=3)
    assert len(list(tmp_path.glob("part-*.safetensors"))) == 2

    computed.clear()
    featurizer.featurize = lambda batch, desc="": (computed.append([e["example_id"] for e in batch]), original(batch, desc))[1]
    resumed = featurize_resumable(featurizer, examples, tmp_path, key="k1", chunk_size=3)
    assert computed == [["ex6", "ex7", "ex8"], ["ex9"]]  # parts 0 and 1 were not recomputed
    assert torch.allclose(resumed.features, reference.features, atol=1e-6)
    computed.clear()
    featurize_resumable(featurizer, examples, tmp_path, key="another checkpoint", chunk_size=3)
    assert len(computed) == 4  # parts written for another key are never reused


def test_scratch_dirs_are_one_per_job_even_when_outputs_share_a_folder(tmp_path):
    from clusterucb.infra.io import scratch_dir_for

    results = tmp_path / "results"
    outputs = [results / f"grads/warmup/pool/shard-{i}.safetensors" for i in range(12)]
    outputs += [results / "runs/a/epoch-1/adapter/adapter_model.safetensors", results / "warmup/adapter/adapter_model.safetensors"]
    dirs = [scratch_dir_for(o, results) for o in outputs]
    assert dirs[1] == results / "scratch/grads/warmup/pool/shard-1"
    for a in dirs:  # disjoint: no job's folder is, or holds, another's
        assert sum(a == b or a in b.parents or b in a.parents for b in dirs) == 1
    with pytest.raises(ValueError, match="not under"):
        scratch_dir_for(tmp_path / "elsewhere/x.parquet", results)


def test_a_shard_that_finishes_keeps_a_concurrent_shards_finished_parts(tmp_path):
    """Two shards of one pool run at once; the first to finish clears only its own scratch
    (a shared folder made the other's next write fail and lost its resume state)."""
    import shutil

    from clusterucb.features.gradients import featurize_resumable
    from clusterucb.infra.io import scratch_dir_for

    model = tiny_lora_llama()
    dim = PerSampleLoraGradients(model).dim
    featurizer = GradientFeaturizer(model, 0, RademacherProjector(dim, 16, seed=0), max_batch_size=4)
    results = tmp_path / "results"
    shard0, shard1 = ragged_examples(6, seed=3), ragged_examples(6, seed=4)
    scratch0, scratch1 = (scratch_dir_for(results / f"grads/warmup/pool/shard-{i}.safetensors", results) for i in (0, 1))

    computed = []
    original = featurizer.featurize

    def dying(batch, desc=""):
        if computed:
            raise KeyboardInterrupt("shard 1 killed in its second part")
        computed.append(batch)
        return original(batch, desc)

    featurizer.featurize = dying
    with pytest.raises(KeyboardInterrupt):
        featurize_resumable(featurizer, shard1, scratch1, key="shard 1", chunk_size=3)
    featurizer.featurize = original
    featurize_resumable(featurizer, shard0, scratch0, key="shard 0", chunk_size=3)
    shutil.rmtree(scratch0)  # what grads_pool_shard does once its outputs are written

    computed.clear()
    featurizer.featurize = lambda batch, desc="": (computed.append(batch), original(batch, desc))[1]
    featurize_resumable(featurizer, shard1, scratch1, key="shard 1", chunk_size=3)
    assert [len(b) for b in computed] == [3]  # only the unfinished part is recomputed


def test_a_throughput_knob_changes_neither_features_nor_the_selection():
    """max_batch_size / max_batch_tokens are not in any rule's params (they rerun nothing): the features
    agree to rounding and the top-k selection they give is the same."""
    from clusterucb.features.matching import influence_scores
    from clusterucb.selection.select import top_k

    model = tiny_lora_llama()
    pool, val = ragged_examples(40, seed=11), ragged_examples(6, seed=12)
    dim = PerSampleLoraGradients(model).dim
    sgd = GradientFeaturizer(model, 0, RademacherProjector(dim, 64, seed=5), max_batch_size=8).featurize(val).features
    subtask = torch.zeros(len(val), dtype=torch.long)
    features = [
        GradientFeaturizer(model, 0, RademacherProjector(dim, 64, seed=5), max_batch_size=batch, max_batch_tokens=tokens)
        .featurize(pool)
        .features
        for batch, tokens in ((1, 10_000), (8, 10_000), (16, 256))
    ]
    for other in features[1:]:
        assert torch.allclose(other, features[0], rtol=1e-5, atol=1e-6)
    selections = [top_k(influence_scores(f, sgd, subtask).numpy(), 8).tolist() for f in features]
    assert selections[0] == selections[1] == selections[2]
