"""Stages: the comparison and selection-quality tables, and the report's figures (matplotlib, Agg)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from clusterucb.infra.io import atomic_path, read_parquet_metadata, write_parquet
from clusterucb.pipeline.downstream import GAIN_STANDARD_ERRORS, mean_over_tasks, seed_summary
from clusterucb.selection.runs import BUDGETED

log = logging.getLogger(__name__)

RUN_COLUMNS = ("policy", "budget", "csp", "beta", "k", "seed")
RECALL_COLUMNS = ("Rs", "Rinf_excess", "Rinf", "budget_in_topk_clusters")


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".4f") -> str:
    def cell(value) -> str:
        if value is None or value is pd.NA or (isinstance(value, float) and value != value):
            return "–"
        return format(value, floatfmt) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _write_table(frame: pd.DataFrame, table_out: str, markdown_out: str, meta: dict, appendix: str = "") -> None:
    """``frame`` as Parquet and as a markdown table, followed by ``appendix`` (more markdown) if any."""
    write_parquet(pa.Table.from_pandas(frame, preserve_index=False), table_out, meta)
    with atomic_path(markdown_out) as tmp:
        tmp.write_text(markdown_table(frame) + appendix)


def headline_metrics(metrics: dict) -> str:
    """The task's other scalar metrics besides the headline one, e.g. 'exact_match=0.31' for TyDiQA."""
    skip = {metrics["metric"], "score", "target_loss", "target_loss_per_example_mean", "target_tokens"}
    items = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, float) and k not in skip]
    return ", ".join(f"{k}={v:.4f}" for k, v in items)


def compare(*, metrics_paths: list[str], params: dict, table_out: str, markdown_out: str, config_out: str, config: dict) -> None:
    """One row per target task and run (and the base model): the task's metric, target loss, gradients computed,
    and oracle recall if measured. The resolved configuration is written beside the table, so every number traces back to it.
    """
    rows = []
    for path in metrics_paths:
        metrics = json.loads(Path(path).read_text())
        task, name = metrics["task"], metrics["run"]
        run = params["runs"].get(name, {"method": name})
        selections = [read_parquet_metadata(p) for p in params["selections"][task].get(name, [])]
        recalls = [json.loads(Path(p).read_text()) for p in params["recalls"][task].get(name, [])]
        row = {"task": task, "run": name, "method": run["method"], "train_seed": run.get("train_seed")}
        row.update({c: run.get(c) for c in RUN_COLUMNS})
        row.update(
            {
                "metric": metrics["metric"],
                "score": metrics["score"],
                "target_loss": metrics["target_loss"],
                "other_metrics": headline_metrics(metrics),
                "n_test": metrics["n_examples"],
                "pool_gradients": sum(int(s["n_gradients"]) for s in selections),
                "gradients_per_epoch": "/".join(str(s["n_gradients"]) for s in selections) or "0",
            }
        )
        for column in RECALL_COLUMNS:  # mean over the re-selection epochs measured by the oracle
            row[column] = float(np.mean([r[column] for r in recalls])) if recalls else None
        rows.append(row)
    frame = pd.DataFrame(rows).astype({"k": "Int64", "seed": "Int64", "train_seed": "Int64"})
    pool = next(
        (read_parquet_metadata(p)["n_pool"] for by_run in params["selections"].values() for paths in by_run.values() for p in paths), None
    )
    _write_table(frame, table_out, markdown_out, {"config": config, "n_pool": pool}, seeds_appendix(frame))
    with atomic_path(config_out) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    log.info("comparison (pool %s):\n%s", pool, frame.to_string(index=False))


def seeds_appendix(frame: pd.DataFrame) -> str:
    """Where some run was trained with more than one seed: each method over its seeds (mean, std, paired
    differences with a bootstrap interval, share of Dynamic's gain), per task and averaged over tasks."""
    if frame.train_seed.nunique(dropna=True) < 2:
        return ""
    summary = seed_summary(frame)
    return (
        "\n## Over training seeds\n\n"
        "Mean and std over each method's training seeds; `vs_random_draw` / `vs_static`: the mean paired difference of "
        "target loss (same seed) with a 95 % bootstrap interval over seeds and the exact sign-flip test's p (negative "
        "favours the row; * the interval excludes 0 and p <= 0.05, which takes at least 6 seeds); `of_dynamic_gain`: (base - run) / (base - dynamic) target loss, at the means, "
        f"where Dynamic's gain over base exceeds {GAIN_STANDARD_ERRORS:g} standard errors of its mean over seeds (any gain at one seed); "
        "– elsewhere, for a share of a gain inside the seed noise measures nothing.\n\n"
        + markdown_table(summary)
        + "\n### Averaged over tasks\n\n`of_dynamic_gain` over the tasks where it is defined (`tasks_with_share`); `pool_gradients` over all.\n\n"
        + markdown_table(mean_over_tasks(summary))
    )


def quality_table(*, sweep_paths: list[str], cluster_paths: list[str], table_out: str, markdown_out: str, figure_out: str) -> None:
    """Recall per target task, checkpoint, method, policy and budget: mean and std over seeds; and the recall-vs-budget figure.

    The markdown also has, per task, checkpoint and K, the cluster sizes and the
    share of the scores' variance the clusters explain (eta2) against random groupings.
    """
    frame = pd.concat([pq.read_table(p).to_pandas() for p in sweep_paths], ignore_index=True)
    for guidance in ("order", "arm_prior", "exhaust"):  # sweeps written before the prior-guided variants
        if guidance not in frame:
            frame[guidance] = None
    frame["variant"] = [variant_name(row) for row in frame.itertuples()]
    keys = ["task", "checkpoint", "method", "variant", "policy", "budget", "csp", "beta", "ucb_p", "k"]
    agg = (
        frame.groupby(keys, sort=False, dropna=False)
        .agg(
            seeds=("Rs", "size"),
            Rs=("Rs", "mean"),
            Rs_std=("Rs", "std"),
            Rinf_excess=("Rinf_excess", "mean"),
            Rinf_excess_std=("Rinf_excess", "std"),
            Rinf=("Rinf", "mean"),
            Rinf_std=("Rinf", "std"),
            budget_in_topk_clusters=("budget_in_topk_clusters", "mean"),
            n_gradients=("n_gradients", "mean"),
        )
        .reset_index()
    )
    # n_gradients: the mean over seeds (early exhaustion can stop a seed's re-selection before the budget).
    agg = agg.sort_values(["task", "checkpoint", "method", "variant", "policy", "budget"], kind="stable")
    agg = agg.astype({"k": "Int64"}).round({"n_gradients": 1})
    clusters = pd.concat([pq.read_table(p).to_pandas() for p in cluster_paths], ignore_index=True)
    appendix = (
        "\nClusters: sizes, and the share of the influence scores' variance they explain (eta2) "
        "against random groupings of the same sizes (mean, std over 200 permutations); "
        "topk_clusters: clusters holding a top-k sample.\n\n" + markdown_table(clusters)
    )
    _write_table(agg, table_out, markdown_out, {"sweeps": sweep_paths, "clusters": cluster_paths}, appendix)
    recall_vs_budget_figure(agg, figure_out)


def variant_name(row) -> str:
    """ClusterUCB's prior guidance as a short label ("paper" when none is on); "" for the other methods."""
    if row.method != "clusterucb":
        return ""
    on = [
        name
        for name, value in (("prior order", row.order == "prior"), ("arm prior", row.arm_prior is True), ("exhaust", row.exhaust is True))
        if value
    ]
    return " + ".join(on) or "paper"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str) -> None:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def recall_vs_budget_figure(agg: pd.DataFrame, out: str) -> None:
    plt = _pyplot()
    checkpoints = list(dict.fromkeys(zip(agg.task, agg.checkpoint)))
    metrics = ("Rs", "Rinf_excess", "Rinf")
    fig, axes = plt.subplots(len(checkpoints), len(metrics), figsize=(16, 3.6 * len(checkpoints)), squeeze=False, constrained_layout=True)
    budgeted = agg[agg.method.isin(BUDGETED)]
    for row, (task, checkpoint) in enumerate(checkpoints):
        here = (agg.task == task) & (agg.checkpoint == checkpoint)
        part = budgeted[here[budgeted.index]]
        baselines = agg[here & (agg.method == "random")]
        static = agg[here & (agg.method == "static")]
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for (method, variant, policy), line in part.groupby(["method", "variant", "policy"], sort=False, dropna=False):
                label = method if method != "clusterucb" else f"clusterucb/{policy}" + ("" if variant == "paper" else f" ({variant})")
                line = line.groupby("budget")[[metric, f"{metric}_std"]].mean().reset_index()
                style = "-" if method == "clusterucb" else "--"  # the baselines dashed
                ax.errorbar(
                    line.budget.astype(float),
                    line[metric],
                    yerr=line[f"{metric}_std"].fillna(0),
                    label=label,
                    linestyle=style,
                    marker="o",
                    capsize=3,
                )
            if len(baselines):
                ax.axhline(float(baselines[metric].mean()), color="grey", linestyle=":", label="random subset")
            if len(static) and checkpoint != "results/warmup":
                ax.axhline(float(static[metric].mean()), color="black", linestyle="-.", label="static (epoch 1's selection, 0 gradients)")
            title = f"{task}: {metric} at {checkpoint}"
            if metric == "Rinf":
                title += "\n(only where the top-k's influence sum is > 0)"
                if part[metric].isna().all():
                    ax.text(0.5, 0.5, "top-k influence sum <= 0:\nRinf undefined", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("budget (fraction of the pool)")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7, loc="upper left")
    _save(fig, out)


def cluster_influence_figure(*, scores_paths: list[str], assignments_path: str, out: str) -> None:
    """Influence distribution per cluster at the warmup checkpoint, clusters sorted by mean influence; a panel per target task."""
    plt = _pyplot()
    clusters = pq.read_table(assignments_path, columns=["example_id", "cluster"]).to_pandas()
    k = int(read_parquet_metadata(assignments_path)["k"])
    fig, axes = plt.subplots(
        len(scores_paths), 1, figsize=(max(8, 0.18 * k), 3.6 * len(scores_paths)), squeeze=False, constrained_layout=True
    )
    for ax, path in zip(axes[:, 0], scores_paths):
        scores = pq.read_table(path, columns=["example_id", "score"]).to_pandas()
        frame = scores.merge(clusters, on="example_id").dropna(subset=["score"])
        order = frame.groupby("cluster").score.mean().sort_values(ascending=False).index
        ax.boxplot([frame.score[frame.cluster == c].to_numpy() for c in order], showfliers=False)
        ax.set_xticks(range(1, len(order) + 1), [str(c) for c in order], rotation=90, fontsize=6)
        ax.set_xlabel(f"cluster (k={k}), by mean influence")
        ax.set_ylabel("influence at the warmup checkpoint")
        ax.set_title(f"Influence distribution per cluster: {read_parquet_metadata(path).get('task')}")
        ax.grid(alpha=0.3, axis="y")
    _save(fig, out)


def cumulative_reward_figure(*, draw_paths: list[str], out: str) -> None:
    """Cumulative influence of the drawn samples, per budgeted run: a row per target task, a column per re-selection epoch."""
    plt = _pyplot()
    frames = []
    for path in draw_paths:
        meta = read_parquet_metadata(path)
        frame = pq.read_table(path, columns=["draw", "score"]).to_pandas()
        frame["task"], frame["run"], frame["epoch"] = meta["task"], meta["run"], int(meta["epoch"])
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True)
    tasks, epochs = list(dict.fromkeys(data.task)), sorted(data.epoch.unique())
    fig, axes = plt.subplots(len(tasks), len(epochs), figsize=(5.5 * len(epochs), 4 * len(tasks)), squeeze=False, constrained_layout=True)
    for row, task in enumerate(tasks):
        for col, epoch in enumerate(epochs):
            ax = axes[row][col]
            for run, part in data[(data.task == task) & (data.epoch == epoch)].groupby("run", sort=True):
                ax.plot(part.draw, part.score.fillna(0).cumsum(), label=run, linestyle="--" if run.startswith("random_draw") else "-")
            ax.set_title(f"{task}: re-selection at epoch {epoch}")
            ax.set_xlabel("draw")
            ax.set_ylabel("cumulative influence of drawn samples")
            ax.grid(alpha=0.3)
        axes[row][-1].legend(fontsize=7)
    _save(fig, out)


def arm_pulls_figure(*, arms_paths: list[str], task: str, out: str) -> None:
    """Pulls per cluster against the cluster's true mean influence (oracle): a row per budgeted run, a column per epoch."""
    plt = _pyplot()
    panels: dict[str, list[str]] = {}
    for path in arms_paths:
        panels.setdefault(Path(path).parent.parent.name, []).append(path)
    n_cols = max(len(v) for v in panels.values())
    fig, axes = plt.subplots(len(panels), n_cols, figsize=(5.5 * n_cols, 4 * len(panels)), squeeze=False, constrained_layout=True)
    for row, (run, paths_) in enumerate(panels.items()):
        for ax, path in zip(axes[row], paths_):
            arms = pq.read_table(path).to_pandas()
            share = arms.pulls / arms["size"]
            ax.scatter(arms.oracle_mean, share, s=10 + 90 * arms["size"] / arms["size"].max(), alpha=0.6)
            corr = np.corrcoef(arms.oracle_mean, share)[0, 1] if len(arms) > 2 and share.std() > 0 else float("nan")
            ax.set_title(f"{task} / {run}, {Path(path).parent.name} (corr {corr:.2f})")
            ax.set_xlabel("true mean influence of the cluster (oracle)")
            ax.set_ylabel("share of the cluster drawn")
            ax.grid(alpha=0.3)
    _save(fig, out)


POOL_COUNTS = ("rows_read", "malformed", "empty_files", "duplicate_ids", "duplicates", "contaminated", "left_by_cap", "kept")


def pool_report(*, pool_table: str, pool_tokens: str, markdown_out: str) -> None:
    """What each source gave the pool (from the pool's metadata) and what tokenization kept of it."""
    from clusterucb.data.tokens import token_meta

    meta = read_parquet_metadata(pool_table)
    frame = pd.DataFrame([{"source": s["source"], **{c: int(s.get(c, 0)) for c in POOL_COUNTS}} for s in meta["sources"]])
    total = {"source": "total", **{c: int(frame[c].sum()) for c in POOL_COUNTS}}
    frame = pd.concat([frame, pd.DataFrame([total])], ignore_index=True).rename(columns={"contaminated": "decontaminated"})
    encoded = token_meta(pool_tokens).get("encode_stats", {})
    notes = [
        "",
        "Counts per source: rows read; malformed rows, empty files and repeated ids (skipped and counted under "
        "`data.on_malformed: skip`, an error otherwise); duplicates (the same conversation again) and decontaminated "
        "rows among the candidates visited before the source's cap; rows left by the cap; rows kept in the pool.",
        f"Decontaminated against: {', '.join(meta.get('decontaminated_against', []))}.",
        "Tokenization (`data.max_length`, `data.overlong`, `data.on_unusable`): " + ", ".join(f"{k} {v}" for k, v in encoded.items()) + ".",
    ]
    for source in meta["sources"]:
        for example in source.get("malformed_examples", [])[:3]:
            notes.append(f"- {source['source']}: {example}")
    with atomic_path(markdown_out) as tmp:
        tmp.write_text(markdown_table(frame) + "\n".join(notes) + "\n")
    log.info("pool by source:\n%s", frame.to_string(index=False))
