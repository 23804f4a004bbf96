"""Wall time and peak RSS of each workflow stage as the pool grows (issue 10).

    python benchmarks/scale.py                          # 10k, 50k and 270k rows (over an hour on 2 cores)
    python benchmarks/scale.py --sizes 2000,8000 --shard-rows 250   # quick check, a few minutes

Pools of N rows are the embedded default's real pool (~3.2k examples from the staged
sources) repeated with new ids. Each stage runs as its own process, exactly the
library call its workflow rule makes, and its peak RSS is that process's
(``wait4``): tokenization (parallel chunks), the per-sample gradient shards
(``--shard-rows`` rows each, tiny Llama with LoRA r=8, d = 8192 sjlt),
k-means (K = 150 on the shards' memory-mapped features, ``--kmeans-iter``
iterations), full matching (scores + top-p) and one budgeted ClusterUCB
re-selection (``--budget`` of the pool, drawn from the clusters).

A gradient shard job costs the same at every N (it reads only its rows), so
above ``--shard-sample`` shards only that many, spread over the pool, are run
and timed; the stage's total is their mean times the shard count (marked ``*``).
The other shards' files get their own rows' ids with a run shard's features
(cycled), so k-means, matching and the re-selection see the full N; their
clusters are not a result, only their time and memory are. Growth exponents are log(t2/t1)/log(N2/N1)
between consecutive sizes. The last line is
``rss_ratio_shard=<shard job peak RSS at the largest / smallest size> time_exponent_max=<largest exponent>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GRADS = {
    "projector": "sjlt",
    "proj_dim": 8192,
    "proj_seed": 0,
    "sjlt_c": 1,
    "dtype": "float16",
    "adam_eps_inside_sqrt": True,
    "max_batch_size": 16,
    "max_batch_tokens": 4096,
}
LORA = {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
TRAIN = {"lr": 1e-3, "warmup_ratio": 0.0, "effective_batch": 16, "micro_batch": 8, "weight_decay": 0.0, "epochs": 1}
MAX_LENGTH = 512
N_VAL = 32

# ------------------------------------------------------------------ jobs (run in a child process each)


def job(name: str, kwargs: dict) -> None:
    """One stage, as its rule's script calls it."""
    import logging

    from clusterucb.infra.logsetup import set_threads

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_threads(int(os.environ.get("SCALE_THREADS", "2")))
    if name == "tokenize":
        from clusterucb.pipeline.data import tokenize_pool as fn
    elif name == "grads_shard":
        from clusterucb.pipeline.grads import grads_pool_shard as fn
    elif name == "grads_val":
        from clusterucb.pipeline.grads import grads_val as fn
    elif name == "kmeans":
        from clusterucb.pipeline.cluster import cluster as fn
    elif name == "scores":
        from clusterucb.pipeline.scores import full_scores as fn
    elif name == "select_top":
        from clusterucb.pipeline.select import select_top_scores as fn
    elif name == "select_budgeted":
        from clusterucb.pipeline.files import Checkpoint, Pool, Selecting, Validation
        from clusterucb.pipeline.reselect import select_budgeted as fn

        grouped = {"at": Checkpoint, "validation": Validation, "pool": Pool, "selecting": Selecting}
        kwargs = {key: grouped[key](**value) if key in grouped else value for key, value in kwargs.items()}
    elif name == "warmup":
        from clusterucb.pipeline.train import warmup as fn
    else:
        raise ValueError(name)
    fn(**kwargs)


def run_job(name: str, log_path: Path, threads: int, **kwargs) -> tuple[float, float]:
    """Run ``name`` in a fresh process; returns (wall seconds, peak RSS in MB)."""
    env = {**os.environ, "SCALE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--job", name, json.dumps(kwargs)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{name} failed (status {status}); see {log_path}")
    return seconds, usage.ru_maxrss / 1024


# ------------------------------------------------------------------ inputs


def base_pool(datasets: Path, seed: int):
    """The embedded demo's pool (configs/demo.yaml's sources), undecontaminated: real rows to repeat."""
    import yaml

    from clusterucb.data.pool import build_pool, pool_table

    sources = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["data"]["sources"]
    rows, _ = build_pool(sources, datasets, [], seed, "skip")
    return pool_table(rows)


def repeated_pool(base, n: int, out: Path) -> None:
    """``n`` rows: base row ``i % len(base)`` with id ``<id>-<i // len(base)>``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from clusterucb.infra.io import write_parquet

    index = np.arange(n) % base.num_rows
    table = base.take(pa.array(index))
    suffix = pa.array([f"-{i}" for i in np.arange(n) // base.num_rows])
    table = table.set_column(
        table.schema.get_field_index("example_id"), "example_id", pc.binary_join_element_wise(table.column("example_id"), suffix, "")
    )
    write_parquet(table, out)


def build_model(base, out: Path, seed: int) -> None:
    """A tiny Llama (the embedded default's sizes, random init) with a BPE tokenizer trained on the pool."""
    from clusterucb.data.tokenize import concat_messages
    from clusterucb.models.modeling import TinyLlamaSpec, build_tiny_llama, train_tokenizer

    texts = [concat_messages(m, "</s>") for m in base.column("messages").to_pylist()]
    tokenizer = train_tokenizer(texts, TinyLlamaSpec().vocab_size)
    model = build_tiny_llama(TinyLlamaSpec(), tokenizer, seed)
    tokenizer.save_pretrained(str(out))
    model.save_pretrained(str(out), safe_serialization=True)


def val_tokens(pool_tokens: Path, out: Path) -> None:
    """The first ``N_VAL`` tokenized pool rows as a one-subtask validation set."""
    import pyarrow as pa

    from clusterucb.data.tokens import TokenTable, tokens_schema, write_tokens

    rows = TokenTable.open(pool_tokens)[:N_VAL].table.to_pylist()
    for row in rows:
        row["example_id"] = "val-" + row["example_id"]
        row["subtask"] = "all"
    schema = tokens_schema((pa.field("subtask", pa.string(), nullable=False),), {"task": "scale", "max_length": MAX_LENGTH})
    write_tokens([pa.Table.from_pylist(rows, schema=schema)], schema, out)


def fill_shard(
    source_tensors: Path, source_index: Path, pool_tokens: Path, shard: int, n_shards: int, tensors_out: Path, index_out: Path
) -> None:
    """A shard not run at this size: its own rows' ids with the features of a run shard's rows, cycled.

    Only the later stages' time and memory are measured on them (k-means, matching, the re-selection,
    which computes its draws' gradients itself); which cluster a row lands in is not a result here.
    """
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    from clusterucb.data.tokens import TokenTable
    from clusterucb.features.gradstore import write_shard
    from clusterucb.infra.io import read_safetensors_metadata
    from clusterucb.pipeline.grads import shard_bounds

    features = load_file(str(source_tensors))["features"]
    losses = torch.as_tensor(np.array(pq.read_table(source_index, columns=["loss"]).column("loss").to_numpy()))
    ok = losses.isfinite()
    pool = TokenTable.open(pool_tokens)
    start, stop = shard_bounds(len(pool), shard, n_shards)
    pick = torch.arange(stop - start) % len(features)
    meta = {k: v for k, v in read_safetensors_metadata(source_tensors).items() if k not in ("schema_version", "shard", "n_rows")}
    write_shard(tensors_out, index_out, shard, pool[start:stop].ids(), features[pick].float(), losses[ok][pick], {}, meta)


# ------------------------------------------------------------------ the benchmark


def exponent(t1: float, t2: float, n1: int, n2: int) -> float:
    return math.log(t2 / t1) / math.log(n2 / n1) if t1 > 0 and t2 > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,270000")
    parser.add_argument("--datasets", default=os.environ.get("CLUSTERUCB_DATASETS", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shard-rows", type=int, default=1000)
    parser.add_argument("--shard-sample", type=int, default=2, help="above this many shards, run only this many (first, spread, last)")
    parser.add_argument("--k", type=int, default=150)
    parser.add_argument("--kmeans-iter", type=int, default=10)
    parser.add_argument("--kmeans-cache-mb", type=float, default=16384, help="cluster.cache_mb (the workflow default)")
    parser.add_argument("--budget", type=float, default=0.05, help="gradient budget of the re-selection, a fraction of the pool")
    parser.add_argument("--top-p", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.job:
        return job(a.job, json.loads(a.args))

    sizes = sorted(int(s) for s in a.sizes.split(","))
    work = Path(a.work or tempfile.mkdtemp(prefix="clusterucb-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    t = a.threads
    print(
        f"scale benchmark: sizes {sizes}, {t} threads, shard {a.shard_rows} rows, K={a.k}, d={GRADS['proj_dim']}, budget {a.budget}, work {work}",
        flush=True,
    )

    # --- shared setup (not timed): model, warmup checkpoint, validation features, features of the base rows
    base = base_pool(Path(a.datasets), a.seed)
    model_dir, setup = work / "model", work / "setup"
    setup.mkdir(exist_ok=True)
    if not (model_dir / "model.safetensors").exists():
        build_model(base, model_dir, a.seed)
    repeated_pool(base, base.num_rows, setup / "pool.parquet")
    tokenize_args = {
        "model_dir": str(model_dir),
        "max_length": MAX_LENGTH,
        "chat_template": "tulu",
        "overlong": "truncate",
        "on_unusable": "skip",
        "workers": t,
    }
    run_job(
        "tokenize", logs / "setup-tokenize.log", t, pool_path=str(setup / "pool.parquet"), out=str(setup / "tokens.arrow"), **tokenize_args
    )
    adapter, optimizer = setup / "warmup" / "adapter", setup / "warmup" / "optimizer.safetensors"
    run_job(
        "warmup",
        logs / "setup-warmup.log",
        t,
        model_dir=str(model_dir),
        pool_tokens=str(setup / "tokens.arrow"),
        adapter_dir=str(adapter),
        optimizer_out=str(optimizer),
        log_out=str(setup / "warmup" / "train_log.parquet"),
        lora=LORA,
        train=TRAIN,
        steps=4,
        epochs=1,
        seed=a.seed,
        scratch=str(setup / "scratch-warmup"),
    )
    val_tokens(setup / "tokens.arrow", setup / "val_tokens.arrow")
    checkpoint = {"model_dir": str(model_dir), "adapter_dir": str(adapter), "checkpoint": "warmup"}
    val = {
        "val_tensors": str(setup / "val.safetensors"),
        "val_index": str(setup / "val.parquet"),
        "val_tokens": str(setup / "val_tokens.arrow"),
    }
    run_job(
        "grads_val",
        logs / "setup-val.log",
        t,
        **checkpoint,
        val_tokens=val["val_tokens"],
        tensors_out=val["val_tensors"],
        index_out=val["val_index"],
        params=GRADS,
    )
    results: dict[int, dict[str, dict]] = {}
    for n in sizes:
        d = work / f"n{n}"
        d.mkdir(exist_ok=True)
        stage: dict[str, dict] = {}
        repeated_pool(base, n, d / "pool.parquet")
        tokens = d / "tokens.arrow"
        sec, rss = run_job("tokenize", logs / f"{n}-tokenize.log", t, pool_path=str(d / "pool.parquet"), out=str(tokens), **tokenize_args)
        stage["tokenize"] = {"s": sec, "rss": rss, "note": f"{n / sec:.0f} rows/s"}

        n_shards = math.ceil(n / a.shard_rows)
        run = (
            sorted({round(i * (n_shards - 1) / max(1, a.shard_sample - 1)) for i in range(a.shard_sample)})
            if n_shards > a.shard_sample
            else list(range(n_shards))
        )
        shard_files = [(d / f"shard-{s}.safetensors", d / f"shard-{s}.parquet") for s in range(n_shards)]
        times, rsses, pending = [], [], []
        for s in range(n_shards):
            if s in run:
                sec, rss = run_job(
                    "grads_shard",
                    logs / f"{n}-shard-{s}.log",
                    t,
                    **checkpoint,
                    optimizer_path=str(optimizer),
                    pool_tokens=str(tokens),
                    shard=s,
                    n_shards=n_shards,
                    tensors_out=str(shard_files[s][0]),
                    index_out=str(shard_files[s][1]),
                    params=GRADS,
                )
                times.append(sec)
                rsses.append(rss)
            else:
                pending.append(s)
        for s in pending:
            fill_shard(*shard_files[run[0]], tokens, s, n_shards, *shard_files[s])
        per_shard = float(np.mean(times))
        stage["grad_shards"] = {
            "s": per_shard * n_shards,
            "rss": max(rsses),
            "shard_s": per_shard,
            "shard_rss": max(rsses),
            "extrapolated": len(run) < n_shards,
            "note": f"{len(run)}/{n_shards} shards run, {n / (per_shard * n_shards):.1f} samples/s",
        }
        from clusterucb.features.gradstore import merge_manifest

        manifest = d / "manifest.parquet"
        merge_manifest([(str(x), str(y)) for x, y in shard_files], manifest)

        assignments = d / "assignments.parquet"
        sec, rss = run_job(
            "kmeans",
            logs / f"{n}-kmeans.log",
            t,
            manifest=str(manifest),
            assignments_out=str(assignments),
            centroids_out=str(d / "centroids.safetensors"),
            k=a.k,
            max_iter=a.kmeans_iter,
            init="k-means++",
            backend="auto",
            seed=a.seed,
            center=True,
            remove_components=1,
            cache_mb=a.kmeans_cache_mb,
        )
        stage["kmeans"] = {
            "s": sec,
            "rss": rss,
            "note": f"K={a.k}, {a.kmeans_iter} iterations max, backend auto, cache {a.kmeans_cache_mb:.0f} MB",
        }

        scores = d / "scores.parquet"
        sec1, rss1 = run_job("scores", logs / f"{n}-scores.log", t, manifest=str(manifest), **val, out=str(scores))
        sec2, rss2 = run_job(
            "select_top",
            logs / f"{n}-select-top.log",
            t,
            scores_path=str(scores),
            pool_tokens=str(tokens),
            pool_table=str(d / "pool.parquet"),
            selection_out=str(d / "full_matching.parquet"),
            top_p=a.top_p,
            task="scale",
            run="full_matching",
            epoch=1,
        )
        stage["full_matching"] = {"s": sec1 + sec2, "rss": max(rss1, rss2), "note": "scores + top-p"}

        run_params = {
            "method": "clusterucb",
            "policy": "ucb_beta",
            "budget": a.budget,
            "csp": 0.05,
            "beta": 1.0,
            "ucb_p": 0.25,
            "draw_batch": 1,
            "tie_break": "random",
            "seed": a.seed,
            "k": a.k,
        }
        draws = d / "draws.parquet"
        sec, rss = run_job(
            "select_budgeted",
            logs / f"{n}-select-budgeted.log",
            t,
            model_dir=checkpoint["model_dir"],
            at={"adapter_dir": checkpoint["adapter_dir"], "optimizer": str(optimizer), "name": checkpoint["checkpoint"]},
            validation={"tensors": val["val_tensors"], "index": val["val_index"], "tokens": val["val_tokens"]},
            pool={"tokens": str(tokens), "table": str(d / "pool.parquet")},
            arms=str(assignments),
            prior=None,
            selecting={"task": "scale", "run": "clusterucb", "epoch": 2},
            run_params=run_params,
            grad_params=GRADS,
            top_p=a.top_p,
            selection_out=str(d / "clusterucb.parquet"),
            draws_out=str(draws),
            scratch=None,
        )
        import pyarrow.parquet as pq

        n_draws = pq.read_metadata(draws).num_rows
        stage["reselect"] = {"s": sec, "rss": rss, "note": f"{n_draws} draws, {n_draws / sec:.1f} draws/s (job wall, model load included)"}
        results[n] = stage
        print(f"\nN = {n}", flush=True)
        for name, r in stage.items():
            extra = f"  (per shard job: {r['shard_s']:.1f} s, {r['shard_rss']:.0f} MB)" if name == "grad_shards" else ""
            print(
                f"  {name:14s} {r['s']:9.1f} s{'*' if r.get('extrapolated') else ' '} {r['rss']:8.0f} MB   {r['note']}{extra}", flush=True
            )

    print("\n| stage | " + " | ".join(f"N={n}: s / peak RSS MB" for n in sizes) + " | time exponent | RSS exponent |")
    print("|---|" + "---|" * (len(sizes) + 2))
    worst = -math.inf
    for name in results[sizes[0]]:
        cells = [
            f"{results[n][name]['s']:.1f}{'*' if results[n][name].get('extrapolated') else ''} / {results[n][name]['rss']:.0f}"
            for n in sizes
        ]
        t_exp = [exponent(results[n1][name]["s"], results[n2][name]["s"], n1, n2) for n1, n2 in zip(sizes, sizes[1:])]
        r_exp = [exponent(results[n1][name]["rss"], results[n2][name]["rss"], n1, n2) for n1, n2 in zip(sizes, sizes[1:])]
        worst = max([worst, *t_exp])
        print(f"| {name} | " + " | ".join(cells) + f" | {', '.join(f'{e:.2f}' for e in t_exp)} | {', '.join(f'{e:.2f}' for e in r_exp)} |")
    # The paper's claim: a ClusterUCB re-selection costs ~budget of a full gradient pass on the same checkpoint.
    rounds = ", ".join(f"N={n}: {results[n]['reselect']['s'] / results[n]['grad_shards']['s']:.3f}" for n in sizes)
    print(f"re-selection wall time / full gradient pass wall time (budget {a.budget}): {rounds}")
    shard_rss = results[sizes[-1]]["grad_shards"]["shard_rss"] / results[sizes[0]]["grad_shards"]["shard_rss"]
    print(f"(* gradient stage total = mean shard job x shards; {a.shard_rows} rows a shard job at every N)")
    print(f"rss_ratio_shard={shard_rss:.3f} time_exponent_max={worst:.3f}")


if __name__ == "__main__":
    main()
