"""ClusterUCB: cheap gradient-based selection of instruction-tuning data.

The package is a library: importing it does no work. The Snakemake workflow
(``Snakefile``) wires its functions into a DAG; ``workflow_scripts/`` holds the
thin entry points.
"""

__version__ = "0.1.0"
