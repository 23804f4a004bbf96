"""The GPU paths agree with the CPU ones and are reproducible (skipped where no GPU is visible).

CI has no GPU, so these run only on a GPU machine: ``python -m pytest tests/unit/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from test_architectures import lora_model
from test_projection_kmeans import separable_sphere
from tinymodels import ragged_examples, random_adam_state, tiny_lora_llama

from clusterucb.gradients import AdamPreconditioner, GradientFeaturizer, PerSampleLoraGradients, pad_batch
from clusterucb.kmeans import spherical_kmeans
from clusterucb.projection import SJLTProjector, make_projector
from clusterucb.schedule import plan_steps
from clusterucb.training import TrainSpec, train_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def cuda_loop_gradients(model, examples) -> torch.Tensor:
    rows = []
    for example in examples:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=torch.tensor([example["input_ids"]], device="cuda"), labels=torch.tensor([example["labels"]], device="cuda"))
        out.loss.backward()
        rows.append(torch.cat([p.grad.flatten() for _, p in model.named_parameters() if p.requires_grad]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


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


@pytest.mark.parametrize("projector_kind", ["rademacher", "sjlt"])
def test_featurizer_on_gpu_matches_cpu_and_repeats_bit_for_bit(projector_kind):
    model = tiny_lora_llama()
    examples = ragged_examples(12, seed=5)
    dim = PerSampleLoraGradients(model).dim
    state = random_adam_state(dim)
    projector = make_projector(projector_kind, dim, 512, seed=3)
    cpu = GradientFeaturizer(model, 0, projector, AdamPreconditioner(state), max_batch_size=4).featurize(examples)
    model = model.cuda()
    runs = [GradientFeaturizer(model, 0, projector, AdamPreconditioner(state), device="cuda", max_batch_size=4).featurize(examples) for _ in range(2)]
    assert torch.equal(runs[0].features, runs[1].features)
    assert float((runs[0].features.cpu().float() * cpu.features.float()).sum(1).min()) > 1 - 1e-5
    assert torch.allclose(runs[0].losses.cpu(), cpu.losses, rtol=1e-5)


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


def test_pykeops_kmeans_on_gpu_agrees_with_torch_on_cpu():
    pytest.importorskip("pykeops")
    x, _ = separable_sphere(n_per=200, k=5, dim=64, seed=6)
    cpu = spherical_kmeans(x, 5, seed=4, backend="torch")
    gpu = spherical_kmeans(x.cuda(), 5, seed=4, backend="pykeops", device="cuda")
    assert torch.equal(cpu.labels, gpu.labels.cpu())
    assert torch.allclose(cpu.centroids, gpu.centroids.cpu(), atol=1e-5)


def without_dropout(model):
    # Dropout masks come from the device's RNG, which differs between CPU and GPU.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_lora_training_on_gpu_follows_the_cpu_trajectory():
    examples = ragged_examples(8, seed=3)
    spec = TrainSpec(lr=1e-2, effective_batch=4, micro_batch=2)
    plan = plan_steps(0, 3, 8, 0.1)
    _, cpu_steps = train_lora(without_dropout(tiny_lora_llama()), examples, spec, plan, 0, [1, 2])
    _, gpu_steps = train_lora(without_dropout(tiny_lora_llama()).cuda(), examples, spec, plan, 0, [1, 2], device="cuda")
    cpu_loss = torch.tensor([s["loss"] for s in cpu_steps])
    gpu_loss = torch.tensor([s["loss"] for s in gpu_steps])
    assert torch.allclose(cpu_loss, gpu_loss, rtol=1e-4), (cpu_loss, gpu_loss)
