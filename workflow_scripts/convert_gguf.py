from pathlib import Path

from _common import finish, init

init(snakemake)
from clusterucb.pipeline.model import convert_gguf

convert_gguf(
    gguf_path=snakemake.input.gguf,
    out_dir=str(Path(snakemake.output.weights).parent),
)
finish()
