"""Per-sample LoRA gradient features: batched, exact, Adam-preconditioned, projected, normalised.

For a linear LoRA factor W (out x in) with inputs x_t and output gradients
d_t, a sample's gradient is sum_t d_t x_t^T. Forward hooks keep each LoRA
factor's input and output; one ``autograd.grad`` of the summed per-sample mean
losses w.r.t. those outputs gives d_t for every sample at once (weight
gradients are never accumulated), and an einsum over tokens gives the
per-sample gradients of the whole micro-batch. Each sample's loss is the mean
over its own target tokens, exactly as a batch-1 ``model(**batch).loss``.

Out of memory (CUDA), a batch is split in halves and retried, down to one
sample; the retry runs after the ``except`` block, once the error's traceback
(which holds the failed batch's graph and activations) is gone, so the memory
really is free. Batches at least as large (in padded tokens) as one that failed
are split before they are tried. Features do not depend on the batch (rel. 1e-5),
so a back-off changes rounding only; a sample is recorded as failed only when it
alone does not fit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clusterucb.data.tokenize import IGNORE_INDEX
from clusterucb.infra.devices import deterministic_algorithms, is_nondeterminism_error, release_memory
from clusterucb.infra.logsetup import progress

log = logging.getLogger(__name__)


def lora_parameter_names(model) -> list[str]:
    """Names of the trainable parameters, in ``named_parameters`` order (the flattening order)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position (B, T) and target tokens per sample (B,).

    The labels are shifted left instead of the logits, so the (B*T, V) view of the
    logits needs no copy and the loss takes PyTorch's fast contiguous path.
    """
    batch, length, vocab = logits.shape
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss = F.cross_entropy(logits.reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return loss.view(batch, length), (shifted != IGNORE_INDEX).sum(1)


class PerSampleLoraGradients:
    """Per-sample gradients of every trainable parameter of a LoRA model, one forward/backward per batch.

    Every trainable parameter must be the weight of an ``nn.Linear`` without a
    trainable bias (peft's ``lora_A`` / ``lora_B``); anything else is refused.
    """

    def __init__(self, model):
        self.model = model
        self.names = lora_parameter_names(model)
        if not self.names:
            raise ValueError("the model has no trainable parameter (is the LoRA adapter attached and trainable?)")
        modules = dict(model.named_modules())
        self.modules: list[torch.nn.Linear] = []
        for name in self.names:
            module_name, _, leaf = name.rpartition(".")
            module = modules.get(module_name)
            if leaf != "weight" or not isinstance(module, torch.nn.Linear):
                raise ValueError(f"unsupported trainable parameter {name!r}: only LoRA Linear weights are supported")
            if module.bias is not None and module.bias.requires_grad:
                raise ValueError(f"unsupported trainable bias in {module_name!r}")
            self.modules.append(module)
        self.shapes = [tuple(m.weight.shape) for m in self.modules]
        self.dim = sum(o * i for o, i in self.shapes)

    def module_grads(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[Iterator[tuple[int, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """One forward/backward for the batch; returns ``(blocks, losses, bad)``.

        ``blocks`` lazily yields ``(offset, grads)`` per LoRA factor, grads (B, n_k) fp32
        in flattening order, so a caller can transform and project one module at a
        time without holding the (B, dim) flat gradient. ``losses`` (B,) are the
        per-sample mean losses; ``bad`` (B,) marks samples without a target token.
        """
        captured: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.modules]

        def make_hook(slot):
            def hook(module, inputs, output):
                slot.append((inputs[0], output))

            return hook

        handles = [m.register_forward_hook(make_hook(captured[k])) for k, m in enumerate(self.modules)]
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            for handle in handles:
                handle.remove()
        for k, calls in enumerate(captured):
            if len(calls) != 1:
                raise RuntimeError(f"{self.names[k]} was called {len(calls)} times in one forward; expected once")

        token_loss, n_target = token_losses(logits, labels)
        del logits
        losses = token_loss.sum(1) / n_target.clamp(min=1)
        output_grads = torch.autograd.grad(losses.sum(), [calls[0][1] for calls in captured])
        inputs = [calls[0][0].detach() for calls in captured]
        del captured
        mask = attention_mask.to(torch.float32)[:, :, None]
        bad = n_target == 0

        def blocks() -> Iterator[tuple[int, torch.Tensor]]:
            offset = 0
            for k, (inp, grad_out) in enumerate(zip(inputs, output_grads)):
                x = inp.float() * mask  # padded positions carry no gradient; zero their inputs too
                grads = torch.einsum("bto,bti->boi", grad_out.float(), x).flatten(1)
                inputs[k] = None  # free activations as we go
                yield offset, grads
                offset += grads.shape[1]

        return blocks(), losses.detach().masked_fill(bad, float("nan")), bad

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(grads, losses)``: (B, dim) fp32 per-sample gradients and (B,) per-sample mean losses.

        Samples without a target token get NaN rows (the caller records them as failures).
        """
        blocks, losses, bad = self.module_grads(input_ids, attention_mask, labels)
        grads = torch.cat([g for _, g in blocks], dim=1)
        return grads.masked_fill_(bad[:, None], float("nan")), losses


@dataclass
class AdamState:
    """First and second moments of the LoRA parameters, flattened in gradient order."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    beta1: float
    beta2: float
    eps: float


class AdamPreconditioner:
    """The LESS / ClusterUCB "Adam" gradient feature (spec §3.3).

    m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2, and
    Gamma = m' / sqrt(v' + eps) (faithful: eps inside the sqrt, no bias
    correction), or m' / (sqrt(v') + eps) with ``eps_inside_sqrt=False``.
    Bias correction is a per-checkpoint scalar and cancels after normalisation.
    """

    def __init__(self, state: AdamState, eps_inside_sqrt: bool = True):
        self.state = state
        self.eps_inside_sqrt = eps_inside_sqrt
        self._device_state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """m and v on ``device``, moved once per checkpoint (not per sample, as the official code does)."""
        key = str(device)
        if key not in self._device_state:
            self._device_state[key] = (self.state.exp_avg.to(device), self.state.exp_avg_sq.to(device))
        return self._device_state[key]

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        return self.block(grads, 0)

    def block(self, grads: torch.Tensor, offset: int) -> torch.Tensor:
        """Gamma for gradient coordinates ``offset : offset + grads.shape[1]`` (one LoRA module)."""
        s = self.state
        stop = offset + grads.shape[1]
        if stop > s.exp_avg.numel():
            raise ValueError(f"block {offset}:{stop} is outside the {s.exp_avg.numel()} optimizer-state dims")
        m_all, v_all = self._on(grads.device)
        m, v = m_all[offset:stop], v_all[offset:stop]
        m_new = s.beta1 * m + (1 - s.beta1) * grads
        v_new = s.beta2 * v + (1 - s.beta2) * grads * grads
        if self.eps_inside_sqrt:
            return m_new / torch.sqrt(v_new + s.eps)
        return m_new / (torch.sqrt(v_new) + s.eps)


def pad_batch(examples: Sequence[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask, labels)``."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        # np.asarray copies: rows of a TokenTable are read-only int32 views into a memory map
        input_ids[row, :n] = torch.as_tensor(np.asarray(example["input_ids"], dtype=np.int64))
        labels[row, :n] = torch.as_tensor(np.asarray(example["labels"], dtype=np.int64))
        attention_mask[row, :n] = 1
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def length_batches(lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Group indices of similar length (longest first) under a size and padded-token budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) >= max_batch_size or longest * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@dataclass
class FeatureResult:
    features: torch.Tensor  # (n, proj_dim) float32, unit rows; rows of failed samples are NaN
    losses: torch.Tensor  # (n,)
    failures: dict[int, str]  # index -> reason; these rows must be excluded, never scored


class GradientFeaturizer:
    """Examples -> unit-norm projected (optionally Adam-preconditioned) gradient features."""

    def __init__(
        self,
        model,
        pad_id: int,
        projector,
        preconditioner=None,
        device="cpu",
        max_batch_size: int = 16,
        max_batch_tokens: int = 8192,
        deterministic: bool = True,
    ):
        self.grads = PerSampleLoraGradients(model)
        if projector.grad_dim != self.grads.dim:
            raise ValueError(f"projector expects {projector.grad_dim} gradient dims, the LoRA model has {self.grads.dim}")
        self.pad_id = pad_id
        self.projector = projector
        self.preconditioner = preconditioner
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self._oom_tokens = math.inf  # padded tokens of the smallest batch that ran out of memory
        # Deterministic algorithms on CUDA (strict; warn-only after an op without a deterministic kernel);
        # ``deterministic=False`` only for benchmarks/gradients.py's line pricing it.
        self.deterministic = deterministic
        self.strict = True

    def _features(self, examples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per module: materialise the per-sample gradients, precondition, project, accumulate."""
        blocks, losses, bad = self.grads.module_grads(*pad_batch(examples, self.pad_id, self.device))
        projected = torch.zeros(len(examples), self.projector.proj_dim, device=self.device)
        for offset, grads in blocks:
            if self.preconditioner is not None:
                grads = self.preconditioner.block(grads, offset)
            projected += self.projector.project_block(grads, offset)
        projected.masked_fill_(bad[:, None], float("nan"))  # not projected[bad] = ...: a boolean index syncs with the host
        return F.normalize(projected, dim=1), losses

    def _attempt(self, examples: Sequence[dict], indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | str:
        """Features of one batch, or why it failed ("oom", or the first line of a refused non-deterministic op).
        Nothing of the failed batch outlives this call: the retry happens in the caller, not in the handler."""
        try:
            with deterministic_algorithms(self.device, self.strict) if self.deterministic else contextlib.nullcontext():
                return self._features([examples[i] for i in indices])
        except torch.OutOfMemoryError:
            return "oom"
        except RuntimeError as error:
            if not is_nondeterminism_error(error):
                raise
            return str(error).splitlines()[0]

    def _run(self, examples: Sequence[dict], indices: list[int], out: FeatureResult) -> None:
        pending = [indices]
        while pending:
            batch = pending.pop()
            tokens = len(batch) * max(len(examples[i]["input_ids"]) for i in batch)
            if len(batch) > 1 and tokens >= self._oom_tokens:  # as large as a batch that did not fit: split first
                half = len(batch) // 2
                pending += [batch[half:], batch[:half]]
                continue
            result = self._attempt(examples, batch)
            if isinstance(result, tuple):
                self._store(batch, *result, out)
                continue
            release_memory(self.device)
            if result != "oom":
                log.warning("%s; going on in warn-only deterministic mode: these features are not bit-repeatable on this GPU", result)
                self.strict = False
                pending.append(batch)
            elif len(batch) == 1:
                out.failures[batch[0]] = "out of memory at batch size 1"
            else:
                self._oom_tokens = min(self._oom_tokens, tokens)
                log.warning("out of memory on a batch of %d samples (%d padded tokens); retrying as two halves", len(batch), tokens)
                half = len(batch) // 2
                pending += [batch[half:], batch[:half]]

    def _store(self, indices: list[int], feats: torch.Tensor, losses: torch.Tensor, out: FeatureResult) -> None:
        """Copy a batch's results to the host (one transfer each) and record its failed samples."""
        feats, losses = feats.to(out.features.device), losses.to(out.losses.device)
        finite = torch.isfinite(feats).all(1) & torch.isfinite(losses)
        for row in torch.nonzero(~finite).flatten().tolist():
            out.failures[indices[row]] = "no target token" if bool(torch.isnan(losses[row])) else "non-finite gradient"
            feats[row] = float("nan")
        out.features[indices] = feats
        out.losses[indices] = losses

    def featurize(self, examples: Sequence[dict], desc: str = "gradients") -> FeatureResult:
        n = len(examples)
        out = FeatureResult(
            features=torch.full((n, self.projector.proj_dim), float("nan")),
            losses=torch.full((n,), float("nan")),
            failures={},
        )
        batches = length_batches([len(e["input_ids"]) for e in examples], self.max_batch_size, self.max_batch_tokens)
        for batch in progress(batches, desc=desc):
            self._run(examples, batch, out)
        if out.failures:
            log.warning("%d of %d samples failed and are excluded: %s", len(out.failures), n, sorted(set(out.failures.values())))
        return out


def featurize_resumable(
    featurizer: GradientFeaturizer,
    examples: Sequence[dict],
    scratch_dir: str | Path | None,
    key: str,
    chunk_size: int = 512,
    desc: str = "gradients",
) -> FeatureResult:
    """``featurizer.featurize`` in chunks whose results are kept in ``scratch_dir``, so a
    killed job resumes at the first unfinished chunk instead of starting over.

    ``key`` identifies everything the features depend on (model, checkpoint,
    projector, examples); parts written under another key are recomputed.
    """
    if scratch_dir is None:
        return featurizer.featurize(examples, desc=desc)
    from safetensors import safe_open

    from clusterucb.infra.io import save_safetensors

    scratch = Path(scratch_dir)
    n = len(examples)
    out = FeatureResult(torch.full((n, featurizer.projector.proj_dim), float("nan")), torch.full((n,), float("nan")), {})
    reused = 0
    for part_index, start in enumerate(range(0, n, chunk_size)):
        stop = min(start + chunk_size, n)
        part = scratch / f"part-{part_index:05d}.safetensors"
        ids = [examples[i]["example_id"] for i in range(start, stop)]
        digest = hashlib.sha256(json.dumps([key, ids]).encode()).hexdigest()
        if part.exists():
            with safe_open(str(part), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("key") == digest:
                    out.features[start:stop] = handle.get_tensor("features")
                    out.losses[start:stop] = handle.get_tensor("losses")
                    out.failures.update({start + int(i): r for i, r in json.loads(meta["failures"]).items()})
                    reused += stop - start
                    continue
        result = featurizer.featurize(examples[start:stop], desc=f"{desc} part {part_index}")
        save_safetensors(
            {"features": result.features, "losses": result.losses}, part, {"key": digest, "failures": json.dumps(result.failures)}
        )
        out.features[start:stop] = result.features
        out.losses[start:stop] = result.losses
        out.failures.update({start + i: r for i, r in result.failures.items()})
    if reused:
        log.info("resumed: %d of %d samples taken from finished parts in %s", reused, n, scratch)
    return out
