from pathlib import Path

from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.pipeline.model import convert_gguf  # noqa: E402

convert_gguf(snakemake.input.gguf, str(Path(snakemake.output.weights).parent))  # noqa: F821
finish()
