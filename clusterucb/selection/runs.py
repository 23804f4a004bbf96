"""Runs: a selection method with its parameters, trained for every epoch.

A run is named after its method and the parameters it changes from the
config's defaults (``clusterucb``, ``clusterucb__policy-ucb1``,
``random_draw__budget-0.1``), so a sweep shares every artefact that does not
depend on what it varies: the warmup gradient pass, the clusters (per k), and
the epoch-1 full-matching selection and training of every Dynamic-family run.

| method      | epoch 1                      | epoch e >= 2                                   | per-sample gradients      |
|-------------|------------------------------|------------------------------------------------|---------------------------|
| clusterucb  | full matching at the warmup  | ClusterUCB at its own epoch e-1 checkpoint      | N + (E-1) * budget * N    |
| random_draw | full matching at the warmup  | budget * N uniform draws, top-k of them         | N + (E-1) * budget * N    |
| prior_rerank| full matching at the warmup  | the budget * N samples of best prior (warmup    | N + (E-1) * budget * N    |
|             |                              | features vs the current validation gradients),  |                           |
|             |                              | re-ranked by fresh gradients                    |                           |
| prior_knn   | full matching at the warmup  | as prior_rerank, the prior corrected as rewards | N + (E-1) * budget * N    |
|             |                              | come in by the drawn neighbours' residuals      |                           |
| static      | full matching at the warmup  | epoch 1's selection again                       | N                         |
| dynamic     | full matching at the warmup  | full matching at its own epoch e-1 checkpoint   | E * N                     |
| less        | LESS (warmup checkpoints, LR-weighted), the same selection every epoch | | C * N             |
| random      | a uniform random subset, the same every epoch |                               | 0                         |

Every run exists once per target task (``runs/<task>/<run>/epoch-<e>``), except
``random``, whose selection never reads a target: it is trained once
(``runs/all/random/...``) and evaluated on every target.

Training seeds: every run may be trained again with another seed (``train_seed``: data order, dropout, and
the selection's own random choices where the sweep does not set ``seed``), named ``<run>__train_seed-<s>``; a
Dynamic-family run with its own training seed starts from an epoch 1 trained with that seed
(``full_matching__train_seed-<s>``: the same selection, its own training), so each seed is a whole independent
run. The master seed's runs keep their plain names. The LoRA's initial A matrices stay the warmup's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from clusterucb.infra.paths import ALL_TASKS, run_checkpoint
from clusterucb.selection.bandit import policy_params

METHODS = ("clusterucb", "random_draw", "prior_rerank", "prior_knn", "static", "dynamic", "less", "random")
BUDGETED = ("clusterucb", "random_draw", "prior_rerank", "prior_knn")
DYNAMIC_FAMILY = ("clusterucb", "random_draw", "prior_rerank", "prior_knn", "static", "dynamic")
PRIOR_METHODS = ("prior_rerank", "prior_knn")  # the prior picks the budget: no clusters, no bandit, no random choice
FEATURE_METHODS = ("prior_knn",)  # read the warmup features (who is whose neighbour)
# ClusterUCB's prior guidance (beyond the paper; selection.PriorGuidance) and the values that mean "off".
GUIDANCE_OFF = {"order": "uniform", "arm_prior": False, "exhaust": False}
SHARED_EPOCH1 = "full_matching"  # the epoch-1 run every Dynamic-family run starts from
TASK_INDEPENDENT = ("random",)  # never reads a target: one selection and training serve every target task

# Parameters a method depends on (and so may vary in a sweep).
RUN_KEYS = {
    "clusterucb": ("policy", "budget", "csp", "beta", "ucb_p", "draw_batch", "tie_break", "k", "seed", "order", "arm_prior", "exhaust"),
    "random_draw": ("budget", "draw_batch", "seed"),
    "prior_rerank": ("budget",),
    "prior_knn": ("budget", "draw_batch"),
    "static": (),
    "dynamic": (),
    "less": (),
    "random": ("seed",),
}


@dataclass(frozen=True)
class Run:
    name: str
    method: str
    params: dict = field(hash=False)
    # The training seed (data order, LoRA init, dropout); kept out of ``params`` so that the selection's
    # inputs do not change with it.
    train_seed: int | None = None
    # The epoch-1 run a Dynamic-family run starts from: the shared full matching trained with its seed.
    epoch1: str = SHARED_EPOCH1

    def checkpoint(self, task: str, epoch: int) -> str:
        """Checkpoint (and selection) directory of ``epoch`` for target ``task``, relative to results/."""
        if epoch < 1:
            raise ValueError(f"epochs start at 1, got {epoch}")
        if self.method in TASK_INDEPENDENT:
            task = ALL_TASKS
        if epoch == 1 and self.method in DYNAMIC_FAMILY:
            return run_checkpoint(task, self.epoch1, 1)
        return run_checkpoint(task, self.name, epoch)


def _format(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def run_name(method: str, overrides: dict) -> str:
    return method + "".join(f"__{key}-{_format(overrides[key])}" for key in sorted(overrides))


def defaults_from_config(selection: dict, cluster_k: int, seed: int) -> dict:
    return {
        "policy": selection["policy"],
        "budget": selection["budget"],
        "csp": selection["csp"],
        "beta": selection["beta"],
        "ucb_p": selection["ucb_p"],
        "draw_batch": selection["draw_batch"],
        "tie_break": selection["tie_break"],
        "k": cluster_k,
        "seed": seed,
        "order": selection.get("order", GUIDANCE_OFF["order"]),
        "arm_prior": selection.get("arm_prior", GUIDANCE_OFF["arm_prior"]),
        "exhaust": selection.get("exhaust", GUIDANCE_OFF["exhaust"]),
        "train_seed": seed,
    }


def make_run(method: str, overrides: dict, defaults: dict) -> Run:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    overrides = dict(overrides)
    train_seed = int(overrides.pop("train_seed", defaults["train_seed"]))
    seeded = {"train_seed": train_seed} if train_seed != defaults["train_seed"] else {}
    if seeded:
        # Another seed of a run repeats all of its randomness, its uniform draws and random subset included (the
        # spread over seeds is then the method's, not only its training's): its selection's seed defaults to it.
        defaults = {**defaults, "seed": train_seed}
    unknown = sorted(set(overrides) - set(RUN_KEYS[method]))
    if unknown:
        raise ValueError(f"method {method!r} does not depend on {unknown}; it takes {list(RUN_KEYS[method]) or 'no parameter'}")
    params = {key: overrides.get(key, defaults[key]) for key in RUN_KEYS[method]}
    if method == "clusterucb":
        # A policy's result does not depend on another policy's parameter: leave it out,
        # so changing it reruns nothing here.
        for key in ("beta", "ucb_p"):
            if key not in policy_params(params["policy"]):
                params.pop(key)
    # An override equal to the default, or one the run does not use, names the default run.
    named = {k: v for k, v in overrides.items() if k in params and v != defaults[k]}
    if method == "clusterucb":
        # The paper's loop (no prior guidance) keeps the parameters it always had, so runs made before
        # these switches existed are not replanned.
        for key, off in GUIDANCE_OFF.items():
            if params[key] == off:
                params.pop(key)
    return Run(run_name(method, {**named, **seeded}), method, params, train_seed, run_name(SHARED_EPOCH1, seeded))


def expand_runs(methods: list[str], sweep: list[dict], defaults: dict, train_seeds: list[int] = ()) -> dict[str, Run]:
    """The runs of ``methods`` (default parameters) plus every point of every sweep grid, each also
    trained once per seed of ``train_seeds`` (the master seed's runs are always there).

    A grid maps ``method`` and parameter names to a value or a list of values;
    its points are the Cartesian product.
    """
    points: list[tuple[str, dict]] = [(method, {}) for method in methods]
    for grid in sweep:
        if "method" not in grid:
            raise ValueError(f"a sweep grid needs a 'method' key: {grid}")
        keys = sorted(grid)
        values = [grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]
        for combination in itertools.product(*values):
            point = dict(zip(keys, combination))
            points.append((point.pop("method"), point))
    runs: dict[str, Run] = {}
    for method, overrides in points:
        for seed in [None, *train_seeds]:
            run = make_run(method, overrides if seed is None else {**overrides, "train_seed": seed}, defaults)
            runs[run.name] = run
    return runs


def epoch1_runs(runs: dict[str, Run], seed: int) -> dict[str, int]:
    """The shared epoch-1 runs (full matching at the warmup) the Dynamic-family ``runs`` start from, with their
    training seeds; the master ``seed``'s (``full_matching``) is always there: the quality replay reads it."""
    out = {SHARED_EPOCH1: seed}
    for run in runs.values():
        if run.method in DYNAMIC_FAMILY and run.epoch1 != SHARED_EPOCH1:
            out[run.epoch1] = run.train_seed
    return out
