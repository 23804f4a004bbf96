"""Settings that change how work is cut into batches, not what it computes (rounding only).

They are kept out of the rules' ``params:`` (scripts read them from the config), so changing one reruns
nothing: a GPU user who lowers a batch size to fit memory recomputes no gradient. The recorded config of
a run (``results/report/config.yaml``) leaves them out for the same reason, and the resources-only ones.
"""

from __future__ import annotations

import copy

THROUGHPUT = {
    "gradients": ("max_batch_size", "max_batch_tokens", "resume_chunk"),
    "target": ("eval_batch_size",),
    "precision": ("gradient_checkpointing",),
    "cluster": ("cache_mb",),
    # dropout masks are keyed per example, not per micro-batch (clusterucb/training/dropout.py)
    "train": ("micro_batch",),
}
# Settings only the rules' ``resources:`` and the start-up GPU memory estimate read: no script sees them.
RESOURCES_ONLY = {"precision": ("activations_on_gpu", "gpu_memory_gb")}


def throughput_settings(config: dict, section: str) -> dict:
    """The throughput settings of one config section."""
    return {key: config[section][key] for key in THROUGHPUT[section]}


def result_config(config: dict) -> dict:
    """The config without its throughput and resources-only settings: everything the results depend on."""
    out = copy.deepcopy(dict(config))
    for excluded in (THROUGHPUT, RESOURCES_ONLY):
        for section, keys in excluded.items():
            for key in keys:
                out.get(section, {}).pop(key, None)
    return _sorted_keys(out)


def _sorted_keys(value):
    """Mappings with their keys in sorted order, recursively. Snakemake compares params by ``repr``, and
    ``--config section={key: value}`` rebuilds that section in another key order: without this, the order
    alone would look like a changed config."""
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value
