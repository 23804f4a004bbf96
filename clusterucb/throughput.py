"""Settings that change how work is cut into batches, not what it computes (rounding only).

They are kept out of the rules' ``params:`` (scripts read them from the config), so changing one reruns
nothing: a GPU user who lowers a batch size to fit memory recomputes no gradient. The recorded config of
a run (``results/report/config.yaml``) leaves them out for the same reason.
"""

from __future__ import annotations

import copy

THROUGHPUT = {"gradients": ("max_batch_size", "max_batch_tokens", "resume_chunk"), "target": ("eval_batch_size",), "precision": ("gradient_checkpointing",), "cluster": ("cache_mb",)}


def throughput_settings(config: dict, section: str) -> dict:
    """The throughput settings of one config section."""
    return {key: config[section][key] for key in THROUGHPUT[section]}


def result_config(config: dict) -> dict:
    """The config without its throughput settings: everything the results depend on."""
    out = copy.deepcopy(dict(config))
    for section, keys in THROUGHPUT.items():
        for key in keys:
            out.get(section, {}).pop(key, None)
    return out
