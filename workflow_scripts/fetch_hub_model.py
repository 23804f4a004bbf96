from pathlib import Path

from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.models.hub import fetch_hub_model  # noqa: E402

fetch_hub_model(snakemake.params.repo, snakemake.params.revision, Path(snakemake.output[0]).parent)  # noqa: F821
finish()
