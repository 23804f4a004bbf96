"""The run's config, layer by layer: the defaults, then the embedded demo or the user's files, then ``--config``.

Snakemake merges every ``--configfile`` into the workflow's own config key by key, so a user pool named
in ``data.sources`` would be added to whatever sources the defaults hold. Here the layers are merged by
the same rule with two exceptions, so that a config means what it says:

- ``data.sources`` is **replaced** by a layer that names it (the pool is exactly the sources of the last
  layer that lists any);
- ``model_fetch`` belongs to ``model``: a layer that sets ``model`` without ``model_fetch`` clears it
  (a wheel to fetch the previous model from must not be applied to another model).

Every other mapping merges key by key (a layer that sets ``lora.r`` keeps the other ``lora`` keys), and
lists are replaced, as in Snakemake. ``config.yaml`` holds only defaults (the paper's values, no pool and
no model); the demo's settings live in ``configs/demo.yaml``, which is layered in only when no
``--configfile`` is given, so nothing of the demo reaches a user's run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import yaml

REPLACED = (("data", "sources"),)  # mappings a layer replaces whole
DEMO = "configs/demo.yaml"
DEFAULTS = "config.yaml"


def _merge(base: dict, layer: dict, path: tuple[str, ...] = ()) -> dict:
    for key, value in layer.items():
        here = (*path, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict) and here not in REPLACED:
            _merge(base[key], value, here)
        else:
            base[key] = copy.deepcopy(value)
    return base


def merge_layers(layers: Iterable[dict]) -> dict:
    """The layers merged in order (later wins): ``data.sources`` replaced, ``model_fetch`` tied to ``model``."""
    config: dict = {}
    for layer in layers:
        layer = layer or {}
        if not isinstance(layer, dict):
            raise ValueError(f"a config layer must be a mapping, got {type(layer).__name__}")
        if "model" in layer and "model_fetch" not in layer:
            config.pop("model_fetch", None)
        _merge(config, layer)
    return config


def load_layer(path: str | Path) -> dict:
    """One YAML config file (an empty file is an empty layer); an unreadable one names the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"config file {path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def layer_files(workflow_dir: str | Path, user_files: Iterable[str | Path]) -> list[Path]:
    """The files whose layers make the config: the defaults, then the user's files, or the demo when none."""
    workflow_dir = Path(workflow_dir)
    user_files = [Path(f) for f in user_files]
    return [workflow_dir / DEFAULTS, *(user_files or [workflow_dir / DEMO])]


def layered_config(workflow_dir: str | Path, user_files: Iterable[str | Path], command_line: dict | None = None) -> dict:
    """The config of a run: defaults, the user's files (or the demo), then the ``--config`` values."""
    layers = [load_layer(path) for path in layer_files(workflow_dir, user_files)]
    return merge_layers([*layers, dict(command_line or {})])
