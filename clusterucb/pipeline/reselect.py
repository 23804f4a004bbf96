"""Stage: a budgeted re-selection (ClusterUCB or random_draw) at a run's previous checkpoint, computing
gradients only for the samples it draws (spec §6)."""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import pyarrow as pa

from clusterucb.features.gradstore import GradientStore
from clusterucb.features.matching import influence_scores
from clusterucb.infra.io import config_hash, file_sha256, write_parquet
from clusterucb.infra.throughput import THROUGHPUT
from clusterucb.pipeline.data import read_tokens
from clusterucb.pipeline.files import Checkpoint, Pool, Selecting, Validation
from clusterucb.pipeline.grads import GradParams, make_featurizer
from clusterucb.pipeline.quality import aligned_scores, warmup_features
from clusterucb.pipeline.scores import val_features
from clusterucb.pipeline.tables import draws_schema, read_assignments, write_selection
from clusterucb.selection.quality import BudgetedSpec, budgeted_selection
from clusterucb.selection.reward_cache import RewardLog

log = logging.getLogger(__name__)


def select_budgeted(
    *,
    model_dir: str,
    at: Checkpoint,
    validation: Validation,
    pool: Pool,
    arms: str,
    prior: str | None,
    selecting: Selecting,
    run_params: dict,
    grad_params: dict,
    top_p: float,
    selection_out: str,
    draws_out: str,
    scratch: str | None = None,
) -> None:
    """ClusterUCB (or random_draw, prior_rerank) at the checkpoint ``at``, the run's previous epoch's:
    gradients only for the drawn samples.

    ``arms``: for ClusterUCB the k-means assignments; for random_draw, whose one
    arm is every clusterable sample, the warmup gradient manifest (a sample is
    clusterable when its warmup gradient succeeded), so that its selection does
    not depend on K. Its draws' ``cluster`` column is then null: which cluster a
    draw fell in is a label the oracle's recall step joins, not an input.

    ``prior``: the prior scores at this checkpoint (warmup features against its validation gradients), for
    prior_rerank and ClusterUCB's prior guidance.

    With ``scratch``, every computed reward is logged there (:class:`RewardLog`):
    a killed job resumes without recomputing them and ends with the same selection.
    """
    task, run, epoch, checkpoint = selecting.task, selecting.run, selecting.epoch, at.name
    spec = BudgetedSpec(**{k: v for k, v in run_params.items() if k in BudgetedSpec.__dataclass_fields__})
    tokens = read_tokens(pool.tokens)  # memory-mapped: only the drawn rows are read
    pool_ids = tokens.ids()
    if spec.method == "clusterucb":
        labels = read_assignments(arms)
        pool_label = np.array([labels.get(example_id, -1) for example_id in pool_ids], dtype=np.int64)
    else:
        ok = set(GradientStore(arms, verify=False).ok_ids())
        pool_label = np.array([0 if example_id in ok else -1 for example_id in pool_ids], dtype=np.int64)
    if (pool_label < 0).any():
        log.warning("%d pool samples are not in any cluster (no warmup gradient) and cannot be drawn", int((pool_label < 0).sum()))

    features = warmup_features(arms, pool_ids) if spec.needs_features else None  # arms: the warmup store's manifest
    featurizer, _ = make_featurizer(model_dir, at.adapter_dir, at.optimizer, checkpoint, "adam", GradParams.from_dict(grad_params))
    val, subtask, _ = val_features(validation.tensors, validation.index, validation.tokens)

    def reward_fn(indices: np.ndarray) -> np.ndarray:
        result = featurizer.featurize(tokens.take(indices), desc="draws")
        return influence_scores(result.features, val, subtask).numpy()

    rewards = None
    if scratch is not None:
        key = config_hash(
            {
                "run": run_params,
                "grads": {k: v for k, v in grad_params.items() if k not in THROUGHPUT["gradients"]},
                "checkpoint": checkpoint,
                "task": task,
                "epoch": epoch,
                "pool": pool_ids,
                "labels": pool_label.tolist(),
                "val": file_sha256(validation.tensors),
            }
        )
        rewards = RewardLog(scratch, key)
        reward_fn = rewards.wrap(reward_fn)
    prior_scores = None
    if spec.needs_prior:
        if prior is None:
            raise ValueError(f"{run}: {spec.method} with {spec.guidance} needs the prior scores at {checkpoint}")
        prior_scores = np.nan_to_num(aligned_scores(prior, pool_ids), nan=-np.inf)
    start = time.perf_counter()
    result, selected = budgeted_selection(
        spec, pool_label, top_p, reward_fn, np.random.default_rng([spec.seed, epoch]), prior=prior_scores, features=features
    )
    seconds = time.perf_counter() - start
    computed = len(result.draws) - (rewards.reused if rewards else 0)
    log.info(
        "%s: %d draws in %.1f s (%.2f draws/s computed; %d rewards taken from an interrupted run)",
        spec.method,
        len(result.draws),
        seconds,
        computed / max(seconds, 1e-9),
        rewards.reused if rewards else 0,
    )
    draws = result.draws
    position = {int(d.index): n for n, d in enumerate(draws)}
    draw_ids = [pool_ids[d.index] for d in draws]
    draw_scores = np.array([d.score for d in draws])
    draw_clusters = [int(pool_label[d.index]) if spec.method == "clusterucb" else None for d in draws]
    run_meta = {**run_params, "task": task, "run": run, "epoch": epoch, "checkpoint": checkpoint}
    write_parquet(
        pa.table(
            {
                "draw": pa.array(range(len(draws)), pa.int32()),
                "step": pa.array([d.step for d in draws], pa.int32()),
                "phase": [d.phase for d in draws],
                "cluster": pa.array(draw_clusters, pa.int32()),
                "example_id": draw_ids,
                "score": pa.array(draw_scores, pa.float32()),
                "arm_value": pa.array([d.arm_value for d in draws], pa.float32()),
            },
            schema=draws_schema(),
        ),
        draws_out,
        run_meta,
    )
    order = [position[int(i)] for i in selected]
    meta = {
        **run_meta,
        "rule": spec.method if spec.method != "clusterucb" else f"clusterucb/{spec.policy}",
        "retired_arms": result.retired,
        "n_pool": len(tokens),
        "n_gradients": len(draws),
        "n_failed": int((~np.isfinite(draw_scores)).sum()),
        "top_p": top_p,
    }
    write_selection([draw_ids[i] for i in order], draw_scores[order], [draw_clusters[i] for i in order], selection_out, meta, pool.table)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
