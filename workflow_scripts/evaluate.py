from pathlib import Path

from _common import finish, init, model_dir, throughput

init(snakemake)
from clusterucb.pipeline.evaluate import evaluate

i, o, p, w = snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards
adapter_dir = str(Path(i.adapter).parent) if i.adapter else None
evaluate(
    task=w.task,
    model_dir=model_dir(i.model),
    adapter_dir=adapter_dir,
    test_path=i.test,
    metrics_out=o.metrics,
    predictions_out=o.predictions,
    params={**p.eval, "batch_size": throughput(snakemake, "target")["eval_batch_size"]},
    run=w.run,
    workers=snakemake.threads,
)
finish()
