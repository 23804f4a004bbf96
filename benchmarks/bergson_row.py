"""Rows (d) of benchmarks/gradients.py: EleutherAI bergson's gradient collection, run as ``bergson build`` runs it.

Runs in bergson's own virtual environment: it imports neither ``clusterucb`` nor anything from this repository.

    python3 -m venv .venv-bergson && . .venv-bergson/bin/activate
    pip install torch==2.13.0                       # the CPU wheel first (any other torch pulls CUDA)
    pip install bergson==2.5.1 torch==2.13.0 transformers peft safetensors numpy
    pip uninstall -y torchvision torchaudio         # bergson requires them but never imports them; their PyPI
                                                    # builds need CUDA torch, and transformers then fails to import
    python benchmarks/bergson_row.py --adapter DIR --examples FILE.json --optimizer-state optimizer.pt \
        --configs global:tokens,per_module:tokens,global:8 --proj-dim 8192 --repeats 3 --threads 2 --out-dir DIR

``--adapter``: a PEFT LoRA adapter directory whose ``adapter_config.json`` names the base model directory (as
``bergson build --model`` takes it); ``--examples``: a JSON list of ``{"input_ids": [...], "labels": [...]}``
(labels -100 on prompt tokens, aligned with input_ids, unshifted): a pre-tokenized dataset, which bergson's
data pipeline passes through untokenized (it only adds a ``length`` column: bergson/utils/worker_utils.py:426-443,
done here the same way); ``--optimizer-state``: a ``torch.save``-d ``optimizer.state_dict()`` of AdamW over the
LoRA weights (bergson's ``IndexConfig.optimizer_state``, read by its ``load_from_optimizer`` into one
``AdamNormalizer`` per LoRA module; ``none``: no normaliser).

Each configuration ``TARGET:BATCHING`` is bergson's own build path (bergson/build.py:84-117):
``setup_model_and_peft`` (fp32), ``create_processor`` (the normalisers from the optimizer state),
``allocate_batches`` (its bin-packing under a token budget, bergson/data.py:191-361) and ``collect_gradients``
(its ``GradientCollector`` hooks, bergson/collection.py:26-45), which writes its on-disk index; the index is read
back with ``load_gradients``. TARGET is ``projection_target``: ``per_module`` (bergson's default,
bergson/config/config.py:643: per module a double-sided projection L G R^T, p^2 features per module, p =
round(sqrt(proj_dim / modules)), so d = modules * p^2 is only close to ``--proj-dim``) or ``global`` (each
module's flattened gradient times its own block of one [proj_dim, n] matrix, summed: one dense JL projection to
``--proj-dim``). BATCHING is ``tokens`` (bergson's default, ``token_batch_size`` 2048: bergson/config/config.py:652,
or ``--token-batch-size``) or a batch size b (``max_batch_size`` b with a token budget of b * the longest example,
so that every batch but the last holds b examples). Loss: ``loss_reduction="mean"`` (each example's summed token
cross-entropy over its label tokens divided by their count), ours; bergson's default is "sum" (config.py:674).

Timed, per repeat: the ``collect_gradients`` call alone (build.py:117), index writing included; a fresh processor
per repeat, as a new ``bergson build`` would have, so per_module's projection matrices, which bergson caches
per processor (bergson/collector/collector.py:360-376), are generated inside each timed run, and global's,
which it never caches, inside every batch (collector.py:393-399 -> 1018-1020 -> 988-994). One untimed warm-up
batch runs first. Each batch's wall time is recorded (the time between its collector's ``process_batch`` calls,
collector.py:829), with its padded token count, for the fixed cost per batch.

``--out-dir`` gets one ``TARGET_BATCHING.npz`` per configuration: ``features`` (N, d) float32 in the order of the
examples, ``seconds`` (R,), ``batch_seconds`` (R, B), ``batch_sizes`` and ``batch_tokens`` (B,) in the order they
ran, ``losses`` (each example's loss as bergson computed it), ``val_features`` with ``--val-examples`` (the same
projection without a normaliser: validation gradients are plain, as in LESS; untimed) and the settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch


def parse_configs(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, _, batching = item.partition(":")
        if target not in ("global", "per_module") or not (batching == "tokens" or batching.isdigit()):
            raise SystemExit(f"--configs: {item!r} is not global|per_module:tokens|N")
        out.append((target, batching))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory; its config names the base model")
    parser.add_argument("--examples", required=True, type=Path)
    parser.add_argument("--val-examples", type=Path, help="optional: featurized after the timed runs (untimed, no normaliser)")
    parser.add_argument("--optimizer-state", default="none", help="optimizer.pt (AdamW state_dict over the LoRA weights) or none")
    parser.add_argument("--configs", default="global:tokens,per_module:tokens")
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--token-batch-size", type=int, default=2048, help="bergson's token_batch_size for 'tokens' batching")
    parser.add_argument("--projection", choices=["rademacher", "normal"], default="rademacher")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = parse_configs(args.configs)

    import bergson
    from bergson import IndexConfig, PreprocessConfig, collect_gradients, load_gradients
    from bergson.collector.gradient_collectors import GradientCollector
    from bergson.data import allocate_batches
    from bergson.utils.worker_utils import create_processor, setup_model_and_peft
    from datasets import Dataset, load_from_disk

    logging.getLogger("CollectorComputer").addFilter(lambda record: record.levelno >= logging.WARNING)

    def dataset(path: Path) -> Dataset:
        rows = json.loads(path.read_text())
        ids = [e["input_ids"] for e in rows]
        return Dataset.from_dict({"input_ids": ids, "labels": [e["labels"] for e in rows], "length": [len(i) for i in ids]})

    data = dataset(args.examples)
    val = dataset(args.val_examples) if args.val_examples else None
    longest = max(data["length"])

    stamps: list[tuple[float, int]] = []
    process_batch = GradientCollector.process_batch

    def timed_process_batch(self, indices, **kwargs):  # each batch's end, after its forward and backward
        process_batch(self, indices, **kwargs)
        stamps.append((time.perf_counter(), len(indices)))

    GradientCollector.process_batch = timed_process_batch

    work = Path(tempfile.mkdtemp(prefix="bergson-row-"))
    runs = iter(range(1 << 30))
    model = target_modules = None

    def index_config(target: str, batching: str, optimizer_state: str) -> IndexConfig:
        if batching == "tokens":
            budget, cap = args.token_batch_size, None
        else:
            budget, cap = int(batching) * longest, int(batching)
        return IndexConfig(
            run_path=str(work / f"run{next(runs)}"),
            model=args.adapter,
            precision="fp32",
            projection_dim=projection_dims[target],
            projection_type=args.projection,
            projection_target=target,
            loss_reduction="mean",
            token_batch_size=budget,
            max_batch_size=cap,
            optimizer_state="" if optimizer_state == "none" else optimizer_state,
        )

    def build(cfg: IndexConfig, ds: Dataset) -> tuple[np.ndarray, np.ndarray, float, list[list[int]], float]:
        """bergson/build.py's build_worker minus its process launch: features, losses, seconds, batches, start."""
        cfg.partial_run_path.mkdir(parents=True)
        processor = create_processor(model, cfg, target_modules)
        batches = allocate_batches(ds["length"][:], cfg.token_batch_size, max_batch_size=cfg.max_batch_size)
        stamps.clear()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        collect_gradients(
            model=model,
            data=ds,
            processor=processor,
            cfg=cfg,
            batches=batches,
            target_modules=target_modules,
            attention_cfgs={},
            preprocess_cfg=PreprocessConfig(),
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        features = np.asarray(load_gradients(cfg.partial_run_path), dtype=np.float32).copy()
        losses = np.asarray(load_from_disk(str(cfg.partial_run_path / "data.hf"))["loss"], dtype=np.float32)
        shutil.rmtree(cfg.partial_run_path)
        return features, losses, seconds, [*batches], start

    # the number of LoRA modules fixes per_module's p; found from the model bergson loads
    projection_dims = {"global": args.proj_dim, "per_module": 1}
    model, target_modules = setup_model_and_peft(index_config(*configs[0], "none"))
    modules = len(target_modules)
    projection_dims["per_module"] = max(1, round(math.sqrt(args.proj_dim / modules)))
    feature_dims = {"global": args.proj_dim, "per_module": modules * projection_dims["per_module"] ** 2}

    warm = index_config("per_module", "tokens", args.optimizer_state)  # kernels and allocator, untimed
    build(warm, data.select([int(np.argmax(data["length"]))]))

    val_features = {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for target, batching in configs:
        seconds, batch_seconds = [], []
        for _ in range(args.repeats):
            cfg = index_config(target, batching, args.optimizer_state)
            features, losses, took, batches, start = build(cfg, data)
            ends = [t for t, _ in stamps]
            assert len(ends) == len(batches), (len(ends), len(batches))
            seconds.append(took)
            batch_seconds.append(np.diff([start, *ends]))
            # One line a run: a global configuration on a large LoRA takes tens of minutes a run on a CPU.
            print(
                f"bergson {target}:{batching} run {len(seconds)}/{args.repeats}: {took:.1f} s, {len(data) / took:.3f} samples/s",
                flush=True,
            )
        if val is not None and target not in val_features:
            val_features[target] = build(index_config(target, batching, "none"), val)[0]
        assert features.shape == (len(data), feature_dims[target]), (features.shape, feature_dims[target])
        lengths = data["length"]
        name = f"{target}_{batching}"
        np.savez(
            args.out_dir / f"{name}.npz",
            features=features,
            seconds=np.array(seconds),
            batch_seconds=np.array(batch_seconds),
            batch_sizes=np.array([len(b) for b in batches]),
            batch_tokens=np.array([len(b) * max(lengths[i] for i in b) for b in batches]),
            losses=losses,
            samples=np.int64(len(data)),
            target=target,
            batching=batching,
            token_batch_size=np.int64(cfg.token_batch_size),
            projection=args.projection,
            projection_dim=np.int64(projection_dims[target]),
            modules=np.int64(modules),
            threads=np.int64(args.threads),
            adam="none" if args.optimizer_state == "none" else "optimizer_state",
            bergson_version=bergson.__version__,
            **({"val_features": val_features[target]} if target in val_features else {}),
        )
        print(
            f"bergson {bergson.__version__} {target} d={feature_dims[target]} ({modules} LoRA modules) batching={batching} "
            f"({len(batches)} batches): {len(data)} samples in min {min(seconds):.2f} s, median {float(np.median(seconds)):.2f} s "
            f"over {len(seconds)} runs ({args.threads} threads)",
            flush=True,
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
