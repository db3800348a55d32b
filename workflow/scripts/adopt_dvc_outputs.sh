#!/usr/bin/env bash
# Let Snakemake take outputs that DVC made or restored (`dvc repro`, `dvc pull`, `dvc checkout`)
# as its own, so that it does not redo that work.
#
#   bash workflow/scripts/adopt_dvc_outputs.sh [snakemake targets and options]
#
# Why: Snakemake reruns a job whose input is newer than its output unless it recorded that
# input's checksum when it last ran the job (.snakemake/metadata). Jobs it ran itself have that
# record, and `dvc pull`/`dvc checkout` then need nothing. Files that only DVC wrote have none,
# and DVC restores files in no particular order. So: first DVC must confirm, by content, that
# every output matches its deps, code and params (dvc.yaml and the Snakemake rules both come
# from modiff/pipeline.py's stage table); only then Snakemake touches every output
# in DAG order and records the jobs as done.
set -euo pipefail
[ $# -gt 0 ] || set -- results/report.md

if ! dvc status --quiet; then
    dvc status >&2 || true
    echo "adopt: DVC's outputs do not match their deps and params (see above); run 'dvc repro'" \
        "(or 'dvc pull'/'dvc checkout') first, or let Snakemake remake them." >&2
    exit 1
fi
snakemake --touch --forceall --cores 1 "$@"
snakemake --dry-run "$@"
