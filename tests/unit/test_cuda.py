"""The GPU paths agree with the CPU ones and are reproducible (skipped where no GPU is visible).

CI has no GPU, so these run only on a GPU machine: ``python -m pytest tests/unit/test_cuda.py`` (or all of
``python benchmarks/gpu_check.py``). The device-generic ones run on any device: ``CLUSTERUCB_TEST_DEVICE=cpu``
runs them on the CPU (``benchmarks/gpu_check.py --device cpu --quick`` does, in CI, so they cannot rot);
those that compare a GPU with the CPU or need CUDA's memory controls are skipped there.
"""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from test_architectures import lora_model
from test_projection_kmeans import separable_sphere
from tinymodels import TEXTS, VOCAB, ragged_examples, random_adam_state, saved_tiny_llama, tiny_lora_llama, train_killed_at_step

from clusterucb.data.tokenize import IGNORE_INDEX
from clusterucb.features.gradients import AdamPreconditioner, GradientFeaturizer, PerSampleLoraGradients, pad_batch
from clusterucb.features.projection import SJLTProjector, make_projector
from clusterucb.selection.kmeans import spherical_kmeans
from clusterucb.training.schedule import plan_steps
from clusterucb.training.trainer import TrainSpec, train_lora

DEVICE = torch.device(os.environ.get("CLUSTERUCB_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(), reason="needs a GPU (CLUSTERUCB_TEST_DEVICE=cpu runs the device-generic tests on the CPU)"
)
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="compares a GPU with the CPU, or needs CUDA's memory controls")


def cuda_loop_gradients(model, examples) -> torch.Tensor:
    rows = []
    for example in examples:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=torch.tensor([example["input_ids"]], device="cuda"), labels=torch.tensor([example["labels"]], device="cuda"))
        out.loss.backward()
        rows.append(torch.cat([p.grad.flatten() for _, p in model.named_parameters() if p.requires_grad]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@cuda_only
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_batched_per_sample_gradients_on_gpu_equal_gpu_loop_and_cpu(arch):
    model = lora_model(arch)
    examples = ragged_examples(6, seed=21)
    cpu, _ = PerSampleLoraGradients(model)(*pad_batch(examples, 0, "cpu"))
    model = model.cuda()
    reference = cuda_loop_gradients(model, examples)
    grads, _ = PerSampleLoraGradients(model)(*pad_batch(examples, 0, "cuda"))
    rel = (grads - reference).norm(dim=1) / reference.norm(dim=1)
    assert float(rel.max()) < 1e-5, (arch, rel)
    rel_cpu = (grads.cpu() - cpu).norm(dim=1) / cpu.norm(dim=1)
    assert float(rel_cpu.max()) < 1e-4, (arch, rel_cpu)


@cuda_only
@pytest.mark.parametrize("projector_kind", ["rademacher", "sjlt"])
def test_featurizer_on_gpu_matches_cpu_and_repeats_bit_for_bit(projector_kind):
    model = tiny_lora_llama()
    examples = ragged_examples(12, seed=5)
    dim = PerSampleLoraGradients(model).dim
    state = random_adam_state(dim)
    projector = make_projector(projector_kind, dim, 512, seed=3)
    cpu = GradientFeaturizer(model, 0, projector, AdamPreconditioner(state), max_batch_size=4).featurize(examples)
    model = model.cuda()
    runs = [
        GradientFeaturizer(model, 0, projector, AdamPreconditioner(state), device="cuda", max_batch_size=4).featurize(examples)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].features, runs[1].features)
    assert float((runs[0].features.cpu().float() * cpu.features.float()).sum(1).min()) > 1 - 1e-5
    assert torch.allclose(runs[0].losses.cpu(), cpu.losses, rtol=1e-5)
    assert not torch.are_deterministic_algorithms_enabled()  # deterministic mode is local to the featurizer's calls


@cuda_only
def test_sjlt_on_gpu_is_reproducible_under_bucket_collisions():
    # 200k coordinates into 64 buckets: thousands of colliding adds per bucket, where
    # atomics would sum in a different order from run to run.
    grads = torch.randn(16, 200_000, device="cuda")
    projector = SJLTProjector(200_000, 64, seed=2, c=2)
    first = projector.project(grads)
    for _ in range(3):
        assert torch.equal(first, projector.project(grads))
    assert not torch.are_deterministic_algorithms_enabled()  # the switch is local to the call
    assert torch.allclose(first.cpu(), SJLTProjector(200_000, 64, seed=2, c=2).project(grads.cpu()), rtol=1e-4, atol=1e-3)


@cuda_only
def test_pykeops_kmeans_on_gpu_agrees_with_torch_on_cpu():
    pytest.importorskip("pykeops", reason="pykeops is not importable here: KeOps not checked")
    x, _ = separable_sphere(n_per=200, k=5, dim=64, seed=6)
    cpu = spherical_kmeans(x, 5, seed=4, backend="torch")
    gpu = spherical_kmeans(x.cuda(), 5, seed=4, backend="pykeops", device="cuda")
    assert torch.equal(cpu.labels, gpu.labels.cpu())
    assert torch.allclose(cpu.centroids, gpu.centroids.cpu(), atol=1e-5)


@cuda_only
def test_lora_training_on_gpu_follows_the_cpu_trajectory_dropout_included():
    # dropout masks are keyed per example, not drawn from a device generator: the same on CPU and GPU
    examples = ragged_examples(8, seed=3)
    spec = TrainSpec(lr=1e-2, effective_batch=4, micro_batch=2)
    plan = plan_steps(0, 3, 8, 0.1)
    _, cpu_steps = train_lora(tiny_lora_llama(), examples, spec, plan, 0, [1, 2])
    _, gpu_steps = train_lora(tiny_lora_llama().cuda(), examples, spec, plan, 0, [1, 2], device="cuda")
    cpu_loss = torch.tensor([s["loss"] for s in cpu_steps])
    gpu_loss = torch.tensor([s["loss"] for s in gpu_steps])
    assert torch.allclose(cpu_loss, gpu_loss, rtol=1e-4), (cpu_loss, gpu_loss)


# ------------------------------------------------------------------ device-generic (CLUSTERUCB_TEST_DEVICE)


def weights_of(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float().cpu() for p in model.parameters() if p.requires_grad])


def rel_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()).norm(dim=1) / b.float().norm(dim=1)).max())


def long_examples(n: int, length: int, seed: int) -> list[dict]:
    """``n`` examples of exactly ``length`` tokens (ids valid for the tiny models' vocabularies), half of them targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(4, VOCAB, (length,), generator=g).tolist()
        out.append({"example_id": f"long{i}", "input_ids": ids, "labels": [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]})
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved base model (fp32 on disk), and an adapter with its AdamW state after two training steps."""
    from clusterucb.models.lora import LoraSpec, attach_lora, save_adapter, save_optimizer_state
    from clusterucb.models.modeling import load_base_model

    root = tmp_path_factory.mktemp("checkpoint")
    base_dir = saved_tiny_llama(root / "base", hidden=128, layers=2)
    model, tokenizer = load_base_model(base_dir)
    peft_model = attach_lora(model, LoraSpec(r=8, alpha=16, dropout=0.1, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=0))
    ckpt, _ = train_lora(
        peft_model,
        ragged_examples(16, seed=30),
        TrainSpec(lr=1e-3, effective_batch=8, micro_batch=4),
        plan_steps(0, 2, 10, 0.0),
        tokenizer.pad_token_id,
        [5],
    )
    save_adapter(peft_model, root / "adapter")
    save_optimizer_state(ckpt, root / "optimizer.safetensors", {"checkpoint": "test"})
    return {
        "model": base_dir,
        "adapter": str(root / "adapter"),
        "optimizer": str(root / "optimizer.safetensors"),
        "pad_id": tokenizer.pad_token_id,
    }


def test_bfloat16_through_the_real_load_path_keeps_features_close_to_float32(checkpoint, monkeypatch):
    """make_featurizer as the workflow calls it (claim the device, load base + adapter onto it in base_dtype)."""
    from clusterucb.pipeline import grads

    if not ON_CUDA:
        monkeypatch.setattr(grads, "device", lambda: DEVICE)  # on a GPU machine the job claims its GPU itself
    examples = ragged_examples(16, seed=31)
    features = {}
    for dtype in ("float32", "bfloat16"):
        params = grads.GradParams(projector="sjlt", proj_dim=1024, base_dtype=dtype, max_batch_size=8)
        featurizer, meta = grads.make_featurizer(
            checkpoint["model"], checkpoint["adapter"], checkpoint["optimizer"], "test", "adam", params
        )
        weights = [p for n, p in featurizer.grads.model.named_parameters() if "lora_" not in n]
        assert {p.dtype for p in weights} == {getattr(torch, dtype)} and {p.device.type for p in weights} == {DEVICE.type}
        assert {p.dtype for p in featurizer.grads.model.parameters() if p.requires_grad} == {torch.float32}
        result = featurizer.featurize(examples)
        assert not result.failures
        features[dtype] = result.features
    cosine = torch.nn.functional.cosine_similarity(features["float32"], features["bfloat16"], dim=1)
    print(f"bf16 vs fp32 feature cosine on {DEVICE.type}: min {float(cosine.min()):.5f} mean {float(cosine.mean()):.5f}")
    assert float(cosine.min()) > 0.98 and float(cosine.mean()) > 0.995


def test_gradient_checkpointing_changes_neither_features_nor_training():
    from clusterucb.models.modeling import enable_gradient_checkpointing

    examples = ragged_examples(10, seed=32)
    models = [tiny_lora_llama(seed=2).to(DEVICE), tiny_lora_llama(seed=2).to(DEVICE)]
    enable_gradient_checkpointing(models[1])
    dim = PerSampleLoraGradients(models[0]).dim
    state = random_adam_state(dim)
    features = [
        GradientFeaturizer(m, 0, SJLTProjector(dim, 256, seed=1), AdamPreconditioner(state), device=DEVICE, max_batch_size=4)
        .featurize(examples)
        .features
        for m in models
    ]
    assert rel_rows(features[1], features[0]) < 1e-5
    spec = TrainSpec(lr=1e-2, effective_batch=4, micro_batch=2, warmup_ratio=0.0)
    trained = []
    for m in models:
        _, steps = train_lora(m, examples, spec, plan_steps(0, 3, 3, 0.0), 0, [4], device=DEVICE)
        trained.append(([s["loss"] for s in steps], weights_of(m)))
    assert trained[1][0] == pytest.approx(trained[0][0], rel=1e-5)  # dropout on: the recompute sees the same masks
    assert float((trained[1][1] - trained[0][1]).norm() / trained[0][1].norm()) < 1e-5


def test_batch_one_with_512_token_sequences_repeats_bit_for_bit():
    examples = long_examples(4, 512, seed=33)
    model = tiny_lora_llama(seed=3).to(DEVICE)
    dim = PerSampleLoraGradients(model).dim
    state = random_adam_state(dim)
    runs = [
        GradientFeaturizer(model, 0, SJLTProjector(dim, 512, seed=2), AdamPreconditioner(state), device=DEVICE, max_batch_size=1).featurize(
            examples
        )
        for _ in range(2)
    ]
    assert not runs[0].failures and torch.equal(runs[0].features, runs[1].features) and torch.equal(runs[0].losses, runs[1].losses)
    trained = []
    for _ in range(2):
        model = tiny_lora_llama(seed=3).to(DEVICE)
        train_lora(model, examples, TrainSpec(lr=1e-2, effective_batch=2, micro_batch=1), plan_steps(0, 2, 2, 0.0), 0, [6], device=DEVICE)
        trained.append(weights_of(model))
    assert torch.equal(trained[0], trained[1])
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the job's calls


def test_training_killed_mid_job_resumes_bit_for_bit_with_dropout(tmp_path, monkeypatch):
    examples = ragged_examples(10, seed=34)
    spec = TrainSpec(lr=1e-2, effective_batch=4, micro_batch=2)

    def run(model, scratch=None):
        return train_lora(model, examples, spec, plan_steps(0, 5, 8, 0.1), 0, [1, 2], device=DEVICE, scratch_dir=scratch, save_every=1)

    reference = tiny_lora_llama(seed=2).to(DEVICE)
    run(reference)
    train_killed_at_step(monkeypatch, 3, lambda: run(tiny_lora_llama(seed=2).to(DEVICE), tmp_path / "scratch"))
    torch.manual_seed(999)
    if ON_CUDA:
        torch.cuda.manual_seed(999)  # whatever the generators hold in the new process
    resumed = tiny_lora_llama(seed=2).to(DEVICE)
    _, steps = run(resumed, tmp_path / "scratch")
    assert [s["global_step"] for s in steps] == [1, 2, 3, 4, 5]
    assert torch.equal(weights_of(resumed), weights_of(reference))


def test_bfloat16_evaluation_unmerged_is_the_trained_model_merged_is_not(tmp_path):
    from clusterucb.data.chat import ChatFormat
    from clusterucb.models.lm import LanguageModel
    from clusterucb.models.lora import LoraSpec, attach_lora, load_lora, save_adapter
    from clusterucb.models.modeling import load_base_model
    from clusterucb.pipeline.evaluate import load_for_evaluation

    base_dir = saved_tiny_llama(tmp_path / "base", hidden=128)
    model, tokenizer = load_base_model(base_dir, torch.bfloat16)
    peft_model = attach_lora(
        model.to(DEVICE), LoraSpec(r=8, alpha=16, dropout=0.1, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=0)
    )
    examples = [{"input_ids": tokenizer(t)["input_ids"], "labels": tokenizer(t)["input_ids"]} for t in TEXTS] * 2
    train_lora(
        peft_model,
        examples,
        TrainSpec(lr=2e-5, effective_batch=4, micro_batch=2, warmup_ratio=0.0),
        plan_steps(0, 3, 3, 0.0),
        tokenizer.pad_token_id,
        [1],
        device=DEVICE,
    )
    save_adapter(peft_model, tmp_path / "adapter")
    triples = [
        ("What is 12 plus 30?", "", "It is 42."),
        ("How many trees?", "The grove", " has 15 trees."),
        ("Add", "def add(a, b):", "\n    return a + b"),
    ]

    def target_loss(model, tokenizer) -> float:
        return LanguageModel(model.eval(), tokenizer, ChatFormat("tulu", tokenizer), DEVICE).completion_nll(triples, 64)["target_loss"]

    trained = target_loss(peft_model, tokenizer)
    evaluated = target_loss(*load_for_evaluation(base_dir, str(tmp_path / "adapter"), "bfloat16", DEVICE))
    base, base_tokenizer = load_base_model(base_dir, torch.bfloat16)
    merged = target_loss(load_lora(base.to(DEVICE), tmp_path / "adapter", trainable=False).merge_and_unload(), base_tokenizer)
    untrained = target_loss(load_base_model(base_dir, torch.bfloat16)[0].to(DEVICE), base_tokenizer)
    print(
        f"bf16 target loss on {DEVICE.type}: trained {trained:.6f} evaluated {evaluated:.6f} merged {merged:.6f} untrained {untrained:.6f}"
    )
    assert evaluated == pytest.approx(trained, rel=1e-6, abs=0)
    assert abs(merged - trained) > 0.2 * abs(untrained - trained)


def test_batched_greedy_generation_equals_batch_one(tmp_path):
    from clusterucb.data.chat import ChatFormat
    from clusterucb.models.lm import LanguageModel
    from clusterucb.models.modeling import load_base_model

    base_dir = saved_tiny_llama(tmp_path / "base", hidden=64, seed=4)
    model, tokenizer = load_base_model(base_dir)
    with torch.no_grad():  # a peaked next-token distribution: a random model's near-ties would be decided by rounding
        model.lm_head.weight.mul_(30)
    model = model.to(DEVICE)
    prompts = [TEXTS[i % len(TEXTS)][: 10 + 7 * i] for i in range(8)]  # different lengths: left padding in a batch
    outputs = {}
    for batch_size in (8, 3, 1):
        lm = LanguageModel(model, tokenizer, ChatFormat("tulu", tokenizer), DEVICE, batch_size=batch_size)
        outputs[batch_size] = lm.greedy(prompts, max_new_tokens=24)
    assert any(outputs[1]) and outputs[8] == outputs[1] and outputs[3] == outputs[1]


@cuda_only
def test_kmeans_keops_against_torch_at_d8192():
    pytest.importorskip("pykeops", reason="pykeops is not importable here: KeOps against torch not measured")
    g = torch.Generator().manual_seed(7)
    centers = torch.nn.functional.normalize(torch.randn(64, 8192, generator=g), dim=1)
    x = torch.nn.functional.normalize(
        centers[torch.randint(0, 64, (8000,), generator=g)] + 0.6 * torch.randn(8000, 8192, generator=g) / 8192**0.5 * 8, dim=1
    )
    x = x.to(DEVICE)
    timings, results = {}, {}
    for backend in ("torch", "pykeops"):
        spherical_kmeans(x[:2000], 64, seed=1, max_iter=1, backend=backend, device=DEVICE)  # warm-up: kernels, KeOps' build
        if ON_CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        results[backend] = spherical_kmeans(x, 64, seed=1, max_iter=10, backend=backend, device=DEVICE)
        if ON_CUDA:
            torch.cuda.synchronize()
        timings[backend] = (time.perf_counter() - start) / max(1, results[backend].n_iter)
    agree = float((results["torch"].labels == results["pykeops"].labels).float().mean())
    print(
        f"k-means d=8192 N=8000 K=64 on {DEVICE.type}: torch {timings['torch']:.4f} s/iter, pykeops {timings['pykeops']:.4f} s/iter, label agreement {agree:.5f}"
    )
    assert agree > 0.999
    assert torch.allclose(results["torch"].centroids, results["pykeops"].centroids, atol=1e-3)


# ------------------------------------------------------------------ CUDA memory and host syncs


@cuda_only
def test_oom_back_off_forced_with_a_memory_fraction(caplog):
    """A per-process memory cap between what one sample and what a full batch need: the gradient pass and a
    training step both back off, drop nothing, and end where an unconstrained run ends."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from clusterucb.models.lora import LoraSpec, attach_lora

    def big_vocab_model():
        torch.manual_seed(0)  # the logits (tokens x 32k vocabulary) dominate the activations
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=0,
        )
        model = attach_lora(LlamaForCausalLM(config), LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj"), seed=0))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
        return model.to("cuda")

    examples = long_examples(16, 256, seed=35)
    model = big_vocab_model()
    dim = PerSampleLoraGradients(model).dim
    state = random_adam_state(dim)

    def featurizer(m):
        return GradientFeaturizer(
            m, 0, SJLTProjector(dim, 256, seed=1), AdamPreconditioner(state), device="cuda", max_batch_size=16, max_batch_tokens=16 * 256
        )

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    reference = featurizer(model).featurize(examples)
    one = peak(lambda: featurizer(model).featurize(examples[:1]))
    full = peak(lambda: featurizer(model).featurize(examples))
    assert full > 3 * one
    total = torch.cuda.get_device_properties(0).total_memory
    spec = TrainSpec(lr=1e-2, effective_batch=16, micro_batch=16, warmup_ratio=0.0)
    trained_reference = big_vocab_model()
    train_lora(trained_reference, examples, spec, plan_steps(0, 2, 2, 0.0), 0, [8], device="cuda")
    try:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((one + (full - one) // 3) / total)
        with caplog.at_level("WARNING"):
            result = featurizer(model).featurize(examples)
            constrained = big_vocab_model()
            train_lora(constrained, examples, spec, plan_steps(0, 2, 2, 0.0), 0, [8], device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "retrying as two halves" in caplog.text and "redoing the step with micro-batches" in caplog.text
    assert not result.failures
    assert rel_rows(result.features, reference.features) < 1e-5
    assert float((weights_of(constrained) - weights_of(trained_reference)).norm() / weights_of(trained_reference).norm()) < 1e-5


@cuda_only
def test_host_syncs_per_gradient_batch_do_not_grow_with_the_batch():
    model = tiny_lora_llama().cuda()
    dim = PerSampleLoraGradients(model).dim
    state = random_adam_state(dim)
    counts = {}
    for n in (2, 12):
        examples = ragged_examples(n, seed=36)
        featurizer = GradientFeaturizer(
            model, 0, SJLTProjector(dim, 256, seed=1), AdamPreconditioner(state), device="cuda", max_batch_size=16
        )
        featurizer.featurize(examples)  # warm-up (projector cache, Adam state on the device)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                featurizer.featurize(examples)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts[n] = sum("synchroniz" in str(w.message) for w in caught)
    assert counts[12] == counts[2], counts
