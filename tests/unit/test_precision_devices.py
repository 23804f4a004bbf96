"""Memory knobs that must not change numbers (gradient checkpointing), base weights in bfloat16 with
float32 LoRA / loss / per-sample sums, and one GPU per job (simulated device counts, on CPU)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from tinymodels import ragged_examples, random_adam_state, tiny_lora_llama

from clusterucb.features.gradients import AdamPreconditioner, GradientFeaturizer, PerSampleLoraGradients, pad_batch
from clusterucb.features.projection import SJLTProjector
from clusterucb.infra import devices
from clusterucb.models.modeling import enable_gradient_checkpointing
from clusterucb.training.schedule import plan_steps
from clusterucb.training.trainer import TrainSpec, train_lora


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_checkpointing_keeps_per_sample_features_exact():
    examples = ragged_examples(9, seed=4)
    plain, checkpointed = tiny_lora_llama(), tiny_lora_llama()
    batch = pad_batch(examples, 0, "cpu")
    reference, ref_losses = PerSampleLoraGradients(plain)(*batch)

    assert enable_gradient_checkpointing(checkpointed) == 2
    mlp_calls = _count_calls(checkpointed.base_model.model.model.layers[0].mlp)
    grads, losses = PerSampleLoraGradients(checkpointed)(*batch)
    assert mlp_calls[0] == 2  # the layer really was recomputed in the backward pass
    rel = (grads - reference).norm(dim=1) / reference.norm(dim=1)
    assert float(rel.max()) < 1e-5 and torch.allclose(losses, ref_losses, rtol=1e-6)

    # the fused path the workflow runs (Adam per module + sjlt), too
    dim = PerSampleLoraGradients(plain).dim
    state = random_adam_state(dim)
    features = [
        GradientFeaturizer(model, 0, SJLTProjector(dim, 256, seed=3), AdamPreconditioner(state), max_batch_size=4)
        .featurize(examples)
        .features
        for model in (plain, checkpointed)
    ]
    assert float(((features[0] - features[1]).norm(dim=1) / features[0].norm(dim=1)).max()) < 1e-5


def test_checkpointed_training_takes_the_same_steps():
    examples = ragged_examples(12, seed=5)
    spec = TrainSpec(lr=1e-2, effective_batch=4, micro_batch=2, warmup_ratio=0.0)
    plan = plan_steps(0, 3, 3, 0.0)
    runs = []
    for checkpointing in (False, True):
        model = tiny_lora_llama()
        if checkpointing:
            enable_gradient_checkpointing(model)
        _, steps = train_lora(model, examples, spec, plan, 0, [7, 1])
        weights = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        runs.append(([s["loss"] for s in steps], weights))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)  # dropout is on: its RNG is replayed exactly
    assert float((runs[0][1] - runs[1][1]).norm() / runs[0][1].norm()) < 1e-5


def test_bfloat16_base_keeps_lora_loss_and_per_sample_sums_in_float32():
    examples = ragged_examples(6, seed=6)
    reference_model = tiny_lora_llama()
    bf16_model = tiny_lora_llama()
    for name, param in bf16_model.named_parameters():  # the frozen base in bf16, the adapter stays fp32
        if "lora_" not in name:
            param.data = param.data.to(torch.bfloat16)
    # A model whose gradients are far below float16's smallest subnormal (6e-8): the official code
    # casts per-sample gradients to fp16 before projecting, which flushes them to zero (spec §10.10).
    for model in (reference_model, bf16_model):
        with torch.no_grad():
            model.base_model.model.lm_head.weight.mul_(1e-7)
    assert {p.dtype for p in bf16_model.parameters() if p.requires_grad} == {torch.float32}

    batch = pad_batch(examples, 0, "cpu")
    reference, _ = PerSampleLoraGradients(reference_model)(*batch)
    grads, losses = PerSampleLoraGradients(bf16_model)(*batch)
    assert grads.dtype == torch.float32 and losses.dtype == torch.float32
    assert float((reference.abs() < 6e-8).float().mean()) > 0.9 and float((reference.half() == 0).float().mean()) > 0.5
    assert (grads.norm(dim=1) > 0).all()
    cosine = torch.nn.functional.cosine_similarity(grads, reference, dim=1)
    assert float(cosine.min()) > 0.99, cosine

    dim = PerSampleLoraGradients(bf16_model).dim
    result = GradientFeaturizer(bf16_model, 0, SJLTProjector(dim, 128, seed=0), max_batch_size=3).featurize(examples)
    assert result.features.dtype == torch.float32 and not result.failures
    assert torch.allclose(result.features.norm(dim=1), torch.ones(len(examples)), atol=1e-5)


def test_base_dtype_names():
    assert devices.base_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision.base_dtype"):
        devices.base_dtype("int8")


# ------------------------------------------------------------------ one GPU per job


@pytest.fixture
def release_all():
    yield
    for index in list(devices._held):
        devices.release_device_index(index)


def test_each_claim_gets_its_own_device_and_waits_when_all_are_taken(tmp_path, release_all):
    assert devices.claim_device_index(2, tmp_path) == 0
    assert devices.claim_device_index(2, tmp_path) == 1
    with pytest.raises(TimeoutError, match="all 2 GPUs"):
        devices.claim_device_index(2, tmp_path, wait_s=0.2, poll_s=0.05)
    devices.release_device_index(0)
    assert devices.claim_device_index(2, tmp_path) == 0


def test_locks_name_physical_devices():
    assert devices.physical_ids(2, "3,5") == ["3", "5"]
    assert devices.physical_ids(3, None) == ["0", "1", "2"]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from clusterucb.infra import devices
    print(devices.claim_device_index(int(sys.argv[1]), sys.argv[2]), flush=True)
    time.sleep(60)
    """
)


def test_concurrent_jobs_on_a_simulated_three_gpu_machine(tmp_path, monkeypatch, release_all):
    """Two other job processes hold GPUs 0 and 1; this job's device() gets cuda:2; a killed job frees its GPU."""
    holders = []
    try:
        for expected in (0, 1):
            proc = subprocess.Popen([sys.executable, "-c", HOLDER, "3", str(tmp_path)], stdout=subprocess.PIPE, text=True)
            holders.append(proc)
            assert proc.stdout.readline().strip() == str(expected)
        monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path))
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
        chosen = []
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        assert devices.device() == torch.device("cuda:2") and chosen == [2]
        assert devices.device() == torch.device("cuda:2")  # one claim per process
        holders[0].kill()
        holders[0].wait()
        assert devices.claim_device_index(3, tmp_path, wait_s=5) == 0  # the killed job's lock went with it
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()


def test_single_visible_gpu_is_taken_without_a_lock(monkeypatch, tmp_path):
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path / "locks"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.device() == torch.device("cuda:0") and not (tmp_path / "locks").exists()


# ------------------------------------------------------------------ computed job memory


def test_job_memory_follows_what_the_job_holds():
    from clusterucb.infra.resources import ModelShape, features_mb, kmeans_job_mb, model_job_mb

    llama7b = ModelShape.from_hf_config({"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32})
    assert 6.5e9 < llama7b.n_params < 7.0e9
    gpu = {"batch_tokens": 4096, "lora_r": 128, "training": False, "activations_in_host": False}
    bf16, fp32 = model_job_mb(llama7b, "bfloat16", **gpu), model_job_mb(llama7b, "float32", **gpu)
    assert 20_000 < bf16 < 30_000 and 1.8 < fp32 / bf16 < 2.05  # the weights dominate; bf16 halves them
    # on CPU the activations are host memory; checkpointing keeps one layer's
    cpu = {**gpu, "activations_in_host": True}
    assert model_job_mb(llama7b, "bfloat16", **cpu) > bf16
    assert model_job_mb(llama7b, "bfloat16", **cpu, checkpointing=True) < model_job_mb(llama7b, "bfloat16", **cpu)
    # a shard job holds its own rows' features, not the pool's
    tiny = ModelShape(8192, 128, 384, 4)
    shard = model_job_mb(tiny, "float32", 4096, 8, False, True, held_mb=features_mb(1000, 8192))
    assert model_job_mb(tiny, "float32", 4096, 8, False, True, held_mb=features_mb(2000, 8192)) > shard
    assert 1219 < shard < 4000  # above the 1219 MB benchmarks/scale.py measured for such a job
    # k-means keeps the prepared float32 rows only when they fit in cache_mb
    store_mb = 270_000 * 8192 * 2 / 2**20  # fp16 store of the paper's pool
    assert kmeans_job_mb(store_mb, "float16", 16_000, 16384, 8192) > 2 * store_mb
    assert kmeans_job_mb(store_mb, "float16", 4096, 16384, 8192) < 5000  # streamed: a few 16k-row blocks


def test_evaluation_memory_counts_a_forward_without_gradient():
    from clusterucb.infra.resources import ModelShape, evaluate_job_mb, evaluation_batch, layer_values_mb, model_job_mb

    smollm2 = ModelShape(49152, 576, 1536, 30, kv_hidden=192, context=8192)
    # target loss only, 8 x 2048 tokens on CPU in float32: measured peaks 2.0 GB (median) to 7.1 GB (MMLU, 5-shot)
    loss_only = evaluation_batch(smollm2, "float32", 8, 2048, 0, task_metric=False)
    assert loss_only.tokens == 8 * 2048
    host = evaluate_job_mb(smollm2, "float32", 128, loss_only, activations_in_host=True)
    assert 7_111 < host < 14_000
    # the training-shaped estimate kept every layer's activations for a backward that never runs
    assert model_job_mb(smollm2, "float32", 8 * 2048, 128, False, True) > 4 * host
    # bfloat16 logits are cast to float32 for the loss, and log-softmax adds another float32 tensor: 10 bytes a logit, not 8
    bf16 = evaluation_batch(smollm2, "bfloat16", 8, 2048, 0, task_metric=False)
    assert bf16.batch_mb == pytest.approx(layer_values_mb(smollm2, "bfloat16", 8 * 2048) + 8 * 2048 * 49152 * 10 / 2**20)
    # one prompt longer than LanguageModel's token budget is a batch of its own; shorter ones share the budget
    assert evaluation_batch(smollm2, "float32", 64, 2048, 0, task_metric=False).tokens == 16384
    assert evaluation_batch(smollm2, "float32", 1, 20_000, 0, task_metric=False).tokens == 20_000
    # generation adds its KV cache: greedy batches share the token budget and grow by max_new_tokens each;
    # pass@k keeps n copies of one prompt, prompt + max_new_tokens each
    greedy = evaluation_batch(smollm2, "float32", 8, 2048, 1024)
    assert greedy.tokens == 16384 + 8 * 1024
    sampled = evaluation_batch(smollm2, "float32", 8, 2048, 1024, generation_batch=200)
    assert sampled.batch_mb > loss_only.batch_mb and sampled.tokens == 200 * (2048 + 1024)
    # the workflow reads a task's n from its settings: the largest pass@k's, none when greedy
    from clusterucb.tasks.base import Sampling, TaskSettings

    passes = (Sampling(n=20, temperature=0.8, top_p=0.95, k=(1, 10)), Sampling(n=200, temperature=0.8, top_p=0.95, k=(100,)))
    assert TaskSettings(sampling=passes).sampled_sequences == 200
    assert TaskSettings(sampling="greedy").sampled_sequences is None and TaskSettings().sampled_sequences is None
    # on a GPU the batch lives in device memory: the host holds the runtime, weights and LoRA
    assert evaluate_job_mb(smollm2, "float32", 128, sampled, activations_in_host=False) < host


# ------------------------------------------------------------------ GPU memory per job


def _gpu_config(**precision):
    return {
        "precision": {"base_dtype": "bfloat16", "gradient_checkpointing": False, **precision},
        "lora": {"r": 128, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train": {"micro_batch": 8},
        "data": {"max_length": 2048, "val_max_length": 1400},
        "gradients": {"projector": "sjlt", "proj_dim": 8192, "sjlt_c": 1, "max_batch_size": 8, "max_batch_tokens": 4096},
        "target": {"eval_batch_size": 8},
        "cluster": {"k": 150, "cache_mb": 16000},
    }


def test_gpu_memory_estimate_per_job_and_the_warning_before_a_sure_oom():
    from clusterucb.infra.resources import ModelShape, activations_mb, format_gpu_plan, gpu_plan, kv_cache_mb

    llama7b = ModelShape.from_hf_config(
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
        }
    )
    assert llama7b.kv == 4096 and llama7b.context == 4096
    plans = {p.job.split(" ")[0]: p for p in gpu_plan(_gpu_config(), llama7b, 270_000, 512, 20)}
    assert set(plans) == {"training", "pool", "validation", "evaluation", "k-means"}
    train = plans["training"]
    assert 12_000 < train.weights_mb < 13_500  # 6.7B bfloat16 weights
    assert 1_900 < train.lora_mb < 2_200  # 134M LoRA parameters x (weight, gradient, m, v) in float32
    assert train.tokens == 8 * 2048 and train.tokens_one == 2048 and train.backs_off
    assert train.total_mb > 80 * 1024 > train.floor_mb  # 8 x 2048 tokens do not fit an 80 GB card; one example does
    # checkpointing keeps one layer's activations; float32 weights double the weights
    assert activations_mb(llama7b, "bfloat16", 2048, True) < activations_mb(llama7b, "bfloat16", 2048, False) / 5
    fp32 = {p.job.split(" ")[0]: p for p in gpu_plan(_gpu_config(base_dtype="float32"), llama7b, 270_000, 512)}
    assert fp32["training"].weights_mb == 2 * train.weights_mb
    # generation holds a KV cache for its whole batch (GQA would shrink it)
    assert plans["evaluation"].batch_mb > kv_cache_mb(llama7b, "bfloat16", 8 * 512)
    gqa = ModelShape(32000, 4096, 11008, 32, kv_hidden=1024)
    assert kv_cache_mb(gqa, "bfloat16", 1000) == kv_cache_mb(llama7b, "bfloat16", 1000) / 4
    # k-means keeps the pool's float32 features on the GPU when they fit in cluster.cache_mb
    assert plans["k-means"].state_mb == pytest.approx(270_000 * 8192 * 4 / 2**20)

    lines, warnings = format_gpu_plan(list(plans.values()), 80)
    assert len(lines) == 2 + 5 and any("training" in w and "halves it" in w for w in warnings)
    assert not any("sure to run out" in w for w in warnings)
    lines, warnings = format_gpu_plan(list(fp32.values()), 24)  # a 7B model in float32 on a 24 GB card
    sure = [w for w in warnings if "sure to run out" in w]
    assert any(w.startswith("training") and "even one example" in w for w in sure)
    assert any(w.startswith("evaluation") for w in sure)
    assert format_gpu_plan(list(plans.values()), None)[1] == []  # card unknown: the table, no warning
