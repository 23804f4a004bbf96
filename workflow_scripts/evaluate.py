from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)  # noqa: F821
from clusterucb.pipeline.evaluate import evaluate  # noqa: E402

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards  # noqa: F821
adapter_dir = str(Path(i.adapter).parent) if i.adapter else None
evaluate(w.task, model_dir(i.model), adapter_dir, i.test, o.metrics, o.predictions, {**p.eval, "batch_size": throughput(snakemake, "target")["eval_batch_size"]}, w.run, snakemake.threads)  # noqa: F821
finish()
