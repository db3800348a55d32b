# modiff pipeline: `snakemake --cores N results/report.md`. Rules live in workflow/rules/; what
# each stage runs, reads and writes is modiff/pipeline.py's stage table (dvc.yaml's source too).
from snakemake.utils import min_version

from modiff.config import VARIANT_NAME_REGEX

min_version("9.0")


configfile: "params.yaml"


include: "workflow/rules/common.smk"


wildcard_constraints:
    variant=VARIANT_NAME_REGEX,
    shard=r"\d+",
    sigma=r"[0-9.e-]+",


# Seconds of light work each, run by Snakemake itself rather than submitted (a cluster job costs
# a queue wait and status polls); fetch_checkpoint also needs the network, which compute nodes
# often lack.
localrules:
    fetch_checkpoint,
    merge_samples,
    damage,
    grid,
    gather,
    report,


include: "workflow/rules/fetch.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "results/report.md",
    default_target: True
