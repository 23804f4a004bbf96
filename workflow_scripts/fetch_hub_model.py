from pathlib import Path

from _common import finish, init

init(snakemake)
from clusterucb.models.hub import fetch_hub_model

fetch_hub_model(
    repo=snakemake.params.repo,
    revision=snakemake.params.revision,
    out_dir=Path(snakemake.output[0]).parent,
)
finish()
