"""A base model given as a Hugging Face hub id (``org/name[@revision]``), fetched once into a local folder.

Kept minimal on purpose: the download is ``huggingface_hub.snapshot_download``
(its own retries and checksums) into a temporary folder renamed into place;
everything after loads the folder like any local model directory. Offline, the
error says how to pass a local copy instead.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+))?")
HUB_CACHE = "resources/models/hub"
# What a causal LM needs; not the other formats a repository may also hold (GGUF, ONNX, pytorch .bin).
ALLOW = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.py"]


def parse_hub_id(model: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``model`` reads as a hub id and is not a local path, else None."""
    if model.endswith(".gguf") or os.path.exists(model) or model.startswith((".", "/", "~")):
        return None
    match = HUB_ID.fullmatch(model)
    return (match["repo"], match["revision"]) if match else None


def hub_model_dir(repo: str, revision: str | None) -> str:
    """The local folder a hub model is fetched into (one per repository and revision)."""
    return f"{HUB_CACHE}/{repo.replace('/', '--')}@{revision or 'main'}"


def fetch_hub_model(repo: str, revision: str | None, out_dir: str | os.PathLike) -> Path:
    """Download the repository's model files into ``out_dir`` (atomically: a temp folder, then a rename)."""
    from huggingface_hub import snapshot_download

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        snapshot_download(repo_id=repo, revision=revision, local_dir=str(tmp), allow_patterns=ALLOW)
    except Exception as error:  # offline, unknown repo, gated model: all end the same way for the user
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"could not fetch the model {repo}@{revision or 'main'} from the Hugging Face hub ({type(error).__name__}: {error}). "
            f"Without a connection, download it elsewhere (huggingface-cli download {repo}"
            f"{' --revision ' + revision if revision else ''} --local-dir DIR), copy DIR here and set the config key model: DIR"
        ) from error
    if not (tmp / "config.json").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{repo}@{revision or 'main'} has no config.json: not a transformers model repository")
    shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("fetched %s@%s into %s", repo, revision or "main", out)
    return out
