# How the stage table (modiff/pipeline.py, which dvc.yaml is generated from too) and the settings
# (`config`: params.yaml plus --config/--configfile, validated as modiff/config.py's typed
# settings) become Snakemake jobs.
import json
import shlex

from modiff.config import parse_params
from modiff.pipeline import COMMANDS, FOREACH_WILDCARD, STAGES, AllOf, code_fingerprint, params_key
from modiff.stages import foreach_items

PARAMS = parse_params(config)  # every problem named before any job runs
PRESET = PARAMS.preset
SHARDS = range(PARAMS.selected.sampling.shards)
# What a stage with `foreach` runs once per: the wildcard naming an item, and the items.
FOREACH_ITEMS = {
    foreach: (wildcard, foreach_items(foreach, PARAMS))
    for foreach, wildcard in FOREACH_WILDCARD.items()
}


def stage_of(name):
    """A stage of the table by its rule name, or by its command (merge, Snakemake's own)."""
    return STAGES.get(name) or COMMANDS[name]


def setting_value(key):
    """The value of a dotted params key in `config` (as given: what DVC compares too)."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def job_text(text, wildcards):
    """A table path or settings key for one job (its preset and wildcards filled in)."""
    return params_key(text).format(preset=PRESET, **dict(wildcards.items()))


def settings(stage):
    """params: `-S key=<json>` for every setting the job reads, passed to `modiff` explicitly.

    The same string is the job's params entry, so changing any of these values reruns it.
    """

    def job(wildcards):
        keys = (job_text(k, wildcards) for k in stage_of(stage).settings_for(wildcards.get("variant")))
        overrides = (f"{key}={json.dumps(setting_value(key))}" for key in keys)
        return " ".join(f"-S {shlex.quote(override)}" for override in overrides)

    return job


def code(stage):
    """params: the fingerprint of the code the stage runs (modiff/codedeps.py), so that a change
    to that code, and no docstring or comment, reruns it."""
    return code_fingerprint(stage_of(stage))


def inputs(stage):
    """input (to unpack): the job's files."""

    def job(wildcards):
        files = {}
        for name, path in stage_of(stage).inputs_for(wildcards.get("variant")).items():
            if isinstance(path, AllOf):
                wildcard, values = FOREACH_ITEMS[path.foreach]
                files[name] = expand(path.pattern, preset=PRESET, **{wildcard: values})
            else:
                files[name] = job_text(path, wildcards)
        return files

    return job


def outputs(stage, **reported):
    """output: the stage's files, with its wildcards; ``reported`` wraps some in report()."""
    files = {k: v.replace("{preset}", PRESET) for k, v in stage_of(stage).outputs.items()}
    return {k: report(v, **reported[k]) if k in reported else v for k, v in files.items()}


def file_options(stage):
    """params: the job's `--<name> <file>` options, one per file of the stage table (an input
    read over all variants or noise levels passes its pattern, which the stage expands)."""

    def job(wildcards, input, output):
        words = []
        for option, kind, key in stage_of(stage).options(wildcards.get("variant")):
            if kind == "wildcard":
                value = wildcards[key]
            elif kind == "input" and isinstance(stage_of(stage).inputs[key], AllOf):
                value = stage_of(stage).inputs[key].pattern
            else:
                value = (input if kind == "input" else output)[key]
            values = value if isinstance(value, list) else [value]
            words += [option, *map(str, values)]
        return shlex.join(words)

    return job


def command(stage, extra=""):
    """shell: `modiff <command> <settings> <files>`, its output to the job's log."""
    return f"modiff {stage_of(stage).command} {{params.settings}} {{params.files}} {extra} > {{log}} 2>&1"
