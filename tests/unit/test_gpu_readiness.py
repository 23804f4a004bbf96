"""What a GPU run relies on, shown on CPU: OOM back-off in the gradient pass and in training (simulated with a
hook that raises ``torch.OutOfMemoryError`` above a batch size), micro_batch as a memory knob only, float16
refused for training, and per-example dropout masks."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import pytest
import torch
from tinymodels import ragged_examples, random_adam_state, tiny_lora_llama

from clusterucb.features.gradients import AdamPreconditioner, GradientFeaturizer, PerSampleLoraGradients
from clusterucb.features.projection import SJLTProjector
from clusterucb.training.dropout import ExampleSeededDropout, example_keys, install_example_dropout, keep_mask
from clusterucb.training.schedule import plan_steps
from clusterucb.training.trainer import TrainSpec, train_lora


class OutOfMemoryAbove:
    """A forward pre-hook that fails like the CUDA allocator when a batch has more than ``limit`` rows.

    For every batch that does run it records whether an exception was still being handled (a retry inside
    the ``except``) and whether the inputs of every batch that failed before it were already freed.
    """

    def __init__(self, model, limit: int):
        self.limit = limit
        self.failed: list[weakref.ref] = []
        self.runs: list[tuple[int, bool, bool]] = []  # (rows, inside an except, every failed batch freed)
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        rows = input_ids.shape[0]
        if rows > self.limit:
            self.failed.append(weakref.ref(input_ids))
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {rows} rows > {self.limit})")
        self.runs.append((rows, sys.exc_info()[0] is not None, all(ref() is None for ref in self.failed)))


def _featurizer(model, max_batch_size: int = 8):
    dim = PerSampleLoraGradients(model).dim
    return GradientFeaturizer(
        model,
        0,
        SJLTProjector(dim, 128, seed=3),
        AdamPreconditioner(random_adam_state(dim)),
        max_batch_size=max_batch_size,
        max_batch_tokens=10**6,
    )


def test_gradient_oom_backs_off_outside_the_handler_and_drops_nothing():
    examples = ragged_examples(11, seed=8)
    model = tiny_lora_llama()
    reference = _featurizer(model).featurize(examples)
    hook = OutOfMemoryAbove(model, limit=2)
    featurizer = _featurizer(model)
    result = featurizer.featurize(examples)
    hook.handle.remove()
    assert hook.failed and not result.failures  # it did run out of memory, and no sample was dropped
    assert {rows for rows, _, _ in hook.runs} <= {1, 2}
    assert not any(inside for _, inside, _ in hook.runs), "a retry ran inside the except block"
    assert all(freed for _, _, freed in hook.runs), "a failed batch's tensors were still alive at the retry"
    rel = (result.features - reference.features).norm(dim=1) / reference.features.norm(dim=1)
    assert float(rel.max()) < 1e-5 and torch.allclose(result.losses, reference.losses, rtol=1e-6)
    # batches as large as one that failed are split before they are tried: one OOM, not one per batch
    failures_first = len(hook.failed)
    hook = OutOfMemoryAbove(model, limit=2)
    featurizer.featurize(examples)
    hook.handle.remove()
    assert len(hook.failed) == 0 and failures_first >= 1


def test_gradient_oom_at_batch_size_one_is_recorded_per_sample():
    examples = ragged_examples(4, seed=9)
    model = tiny_lora_llama()
    hook = OutOfMemoryAbove(model, limit=0)
    result = _featurizer(model).featurize(examples)
    hook.handle.remove()
    assert result.failures == {i: "out of memory at batch size 1" for i in range(4)}
    assert torch.isnan(result.features).all()


def _train(model, examples, micro_batch: int, n_steps: int = 3, dropout_on: bool = True):
    spec = TrainSpec(lr=1e-2, effective_batch=4, micro_batch=micro_batch, warmup_ratio=0.0)
    if not dropout_on:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    _, steps = train_lora(model, examples, spec, plan_steps(0, n_steps, n_steps, 0.0), 0, [3, 1])
    weights = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    return [s["loss"] for s in steps], weights


def test_micro_batch_changes_nothing_but_rounding_with_dropout_on():
    examples = ragged_examples(12, seed=10)
    runs = {micro: _train(tiny_lora_llama(seed=4), examples, micro) for micro in (4, 2, 1)}
    losses4, weights4 = runs[4]
    for micro in (2, 1):
        losses, weights = runs[micro]
        assert losses == pytest.approx(losses4, rel=1e-5), micro
        assert float((weights - weights4).norm() / weights4.norm()) < 1e-5, micro
    # dropout is really on: without it the trajectory is another one
    losses_off, weights_off = _train(tiny_lora_llama(seed=4), examples, 4, dropout_on=False)
    assert float((weights_off - weights4).norm() / weights4.norm()) > 1e-3


def test_training_oom_redoes_the_step_with_smaller_micro_batches(caplog):
    examples = ragged_examples(12, seed=11)
    _, reference = _train(tiny_lora_llama(seed=5), examples, 4)
    model = tiny_lora_llama(seed=5)
    hook = OutOfMemoryAbove(model, limit=1)
    with caplog.at_level("WARNING", logger="clusterucb.training.trainer"):
        _, weights = _train(model, examples, 4)
    hook.handle.remove()
    assert hook.failed and {rows for rows, _, _ in hook.runs} == {1}
    assert not any(inside for _, inside, _ in hook.runs) and all(freed for _, _, freed in hook.runs)
    assert "micro-batches of 2" in caplog.text and "micro-batches of 1" in caplog.text
    assert float((weights - reference).norm() / reference.norm()) < 1e-5


class FailsInBackward(torch.autograd.Function):
    """Identity forward; its backward raises OOM while ``armed`` (after other parameters got part of their gradient)."""

    armed = [0]

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if FailsInBackward.armed[0] > 0:
            FailsInBackward.armed[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, in backward)")
        return grad


def test_training_oom_in_backward_discards_the_partial_gradient():
    examples = ragged_examples(12, seed=12)
    _, reference = _train(tiny_lora_llama(seed=6), examples, 2)
    model = tiny_lora_llama(seed=6)
    # the output of the first layer's attention: its backward runs after the LoRA factors of later layers got gradients
    layer = model.base_model.model.model.layers[0].self_attn
    handle = layer.register_forward_hook(lambda m, a, out: (FailsInBackward.apply(out[0]), *out[1:]))
    FailsInBackward.armed[0] = 1
    try:
        _, weights = _train(model, examples, 2)
    finally:
        handle.remove()
    assert FailsInBackward.armed[0] == 0
    assert float((weights - reference).norm() / reference.norm()) < 1e-5


def test_training_refuses_a_float16_base():
    import jsonschema
    import yaml

    REPO = Path(__file__).resolve().parents[2]
    schema = yaml.safe_load((REPO / "config.schema.yaml").read_text())["properties"]["precision"]["properties"]["base_dtype"]
    jsonschema.validate("bfloat16", schema)
    with pytest.raises(jsonschema.ValidationError):  # the workflow refuses it at start
        jsonschema.validate("float16", schema)
    model = tiny_lora_llama()
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.data = param.data.half()
    with pytest.raises(ValueError, match="float16.*loss scaling.*bfloat16"):
        _train(model, ragged_examples(4), 4, n_steps=1)


def test_dropout_masks_belong_to_the_example():
    # the same example gets the same mask whatever else is in its batch and however much padding it has
    alone = keep_mask([11], 5, (1, 20, 16), 0.3, "cpu")
    batched = keep_mask([7, 11, 9], 5, (3, 37, 16), 0.3, "cpu")
    assert torch.equal(batched[1, :20], alone[0])
    assert not torch.equal(batched[0], batched[1])
    assert abs(float(batched.float().mean()) - 0.7) < 0.03
    assert not torch.equal(keep_mask([11], 6, (1, 20, 16), 0.3, "cpu"), alone)  # another module, another mask
    model = tiny_lora_llama()
    assert install_example_dropout(model) == 8 == install_example_dropout(model)  # 4 modules x 2 layers; idempotent
    dropout = next(m for m in model.modules() if isinstance(m, ExampleSeededDropout))
    dropout.train()
    with pytest.raises(RuntimeError, match="row keys"):
        dropout(torch.ones(1, 3, 4))
    with example_keys([1]):
        out = dropout(torch.ones(1, 3, 4))
    assert torch.isclose(out, torch.tensor(0.0)).logical_or(torch.isclose(out, torch.tensor(1 / 0.9))).all()
    dropout.eval()
    assert torch.equal(dropout(torch.ones(1, 3, 4)), torch.ones(1, 3, 4))


# ------------------------------------------------------------------ evaluation in bfloat16 evaluates the trained model


def test_bfloat16_evaluation_is_the_trained_adapter_unmerged(tmp_path):
    from tinymodels import TEXTS, saved_tiny_llama

    from clusterucb.data.chat import ChatFormat
    from clusterucb.models.lm import LanguageModel
    from clusterucb.models.lora import LoraSpec, attach_lora, load_lora, save_adapter
    from clusterucb.models.modeling import load_base_model
    from clusterucb.pipeline.evaluate import load_for_evaluation

    base_dir = saved_tiny_llama(tmp_path / "base")
    model, tokenizer = load_base_model(base_dir, torch.bfloat16)
    peft_model = attach_lora(model, LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=0))
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    examples = [{"input_ids": tokenizer(t)["input_ids"], "labels": tokenizer(t)["input_ids"]} for t in TEXTS] * 2
    train_lora(
        peft_model,
        examples,
        TrainSpec(lr=2e-5, effective_batch=4, micro_batch=2, warmup_ratio=0.0),
        plan_steps(0, 3, 3, 0.0),
        tokenizer.pad_token_id,
        [1],
    )
    save_adapter(peft_model, tmp_path / "adapter")
    triples = [
        ("What is 12 plus 30?", "", "It is 42."),
        ("How many trees?", "The grove", " has 15 trees."),
        ("Add", "def add(a, b):", "\n    return a + b"),
    ]

    def target_loss(model, tokenizer) -> float:
        return LanguageModel(model.eval(), tokenizer, ChatFormat("tulu", tokenizer)).completion_nll(triples, 64)["target_loss"]

    trained = target_loss(peft_model, tokenizer)
    evaluated = target_loss(*load_for_evaluation(base_dir, str(tmp_path / "adapter"), "bfloat16", "cpu"))
    assert evaluated == pytest.approx(trained, rel=1e-6, abs=0)
    # what merging into the bfloat16 weights did: most deltas vanish below half a bfloat16 ulp, another model
    base, base_tokenizer = load_base_model(base_dir, torch.bfloat16)
    reference = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    merged = load_lora(base, tmp_path / "adapter", trainable=False).merge_and_unload()
    unchanged = float((merged.model.layers[0].self_attn.q_proj.weight == reference).float().mean())
    assert unchanged > 0.5, unchanged  # at the default lr, 2e-5: ~90 % of the weights did not move
    untrained = target_loss(*load_base_model(base_dir, torch.bfloat16))
    lost = abs(target_loss(merged, base_tokenizer) - trained) / abs(untrained - trained)
    assert lost > 0.2, lost  # a good part of what training changed in the target loss is gone


# ------------------------------------------------------------------ devices: claim first, one CUDA generator


def test_gradient_jobs_claim_their_gpu_before_loading_onto_it(monkeypatch):
    from clusterucb.pipeline import grads

    calls = []

    def claim():
        calls.append("claim")
        return torch.device("cpu")

    def load(model_dir, adapter_dir, dtype, device):
        calls.append(("load", device))
        raise RuntimeError("stop here")

    monkeypatch.setattr(grads, "device", claim)
    monkeypatch.setattr(grads, "load_checkpoint", load)
    with pytest.raises(RuntimeError, match="stop here"):
        grads.make_featurizer("m", "a", None, "warmup", "sgd", grads.GradParams())
    assert calls == ["claim", ("load", torch.device("cpu"))]


def test_training_state_keeps_only_the_claimed_gpus_generator(monkeypatch):
    import json

    from clusterucb.training import trainer as training

    current = torch.arange(16, dtype=torch.uint8)
    restored = []

    def everything(*_):
        raise AssertionError("every visible GPU's generator was touched")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": current.clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", everything)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", everything)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    state = json.loads(json.dumps(training.capture_rng_state()))
    assert state["cuda_current"] == current.tolist()
    training.restore_rng_state(state)  # on a machine with fewer visible GPUs, or another claimed one: the current device's
    assert len(restored) == 1 and torch.equal(restored[0], current)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    training.restore_rng_state(state)  # resumed without a GPU: dropout does not need the CUDA generator


# ------------------------------------------------------------------ deterministic algorithms (CUDA), and the fallback


def test_deterministic_mode_is_switched_on_around_the_call_only(monkeypatch):
    from clusterucb.infra import devices

    monkeypatch.delenv(devices.CUBLAS_ENV, raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with devices.deterministic_algorithms("cpu"):
        assert not torch.are_deterministic_algorithms_enabled()  # CPU kernels are deterministic already
    with devices.deterministic_algorithms("cuda"):  # only flips PyTorch's switch: no GPU needed to check that
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        import os

        assert os.environ[devices.CUBLAS_ENV] in devices.CUBLAS_DETERMINISTIC
    with devices.deterministic_algorithms("cuda", strict=False):
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv(devices.CUBLAS_ENV, ":0:0")  # a workspace config cuBLAS is not deterministic with: warn-only
    with devices.deterministic_algorithms("cuda"):
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


class RefusedOnce:
    """Raises what strict deterministic mode raises for an op without a deterministic CUDA kernel, once."""

    MESSAGE = "scatter_add_cuda_kernel does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms(True)'"

    def __init__(self, model):
        self.left = 1
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *args):
        if self.left:
            self.left -= 1
            raise RuntimeError(self.MESSAGE)


def test_an_op_refused_by_deterministic_mode_falls_back_to_warn_only(caplog):
    from clusterucb.infra.devices import is_nondeterminism_error

    assert is_nondeterminism_error(RuntimeError(RefusedOnce.MESSAGE)) and not is_nondeterminism_error(RuntimeError("shape mismatch"))
    examples = ragged_examples(6, seed=13)
    model = tiny_lora_llama()
    reference = _featurizer(model).featurize(examples)
    refused = RefusedOnce(model)
    featurizer = _featurizer(model)
    with caplog.at_level("WARNING"):
        result = featurizer.featurize(examples)
    refused.handle.remove()
    assert not featurizer.strict and "warn-only" in caplog.text and not result.failures
    assert torch.equal(result.features, reference.features)
    # training: the step is redone from zero gradients, the job goes on
    _, trained = _train(tiny_lora_llama(seed=7), examples, 2)
    model = tiny_lora_llama(seed=7)
    refused = RefusedOnce(model)
    _, weights = _train(model, examples, 2)
    refused.handle.remove()
    assert refused.left == 0 and torch.equal(weights, trained)
