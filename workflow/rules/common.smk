# How the stage table (modiff/pipeline.py, which dvc.yaml is generated from too) and the settings
# (`config`: params.yaml plus --config/--configfile) become Snakemake jobs.
import json
import shlex

from modiff.pipeline import MERGE, STAGES, Each, code_deps, params_key

PRESET = config["preset"]
SAMPLING = config["presets"][PRESET]["sampling"]
SHARDS = range(SAMPLING["shards"])
# What a stage with `foreach` runs once per, and the wildcard naming it in paths.
OVER = {
    "variants": ("variant", list(config["variants"])),
    "sigmas": ("sigma", [f"{s:g}" for s in config["damage_check"]["sigmas"]]),
}


def stage_of(name):
    return MERGE if name == "merge" else STAGES[name]


def lookup(key):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _fill(text, wildcards):
    """A table path or settings key for one job (its preset and wildcards)."""
    return params_key(text).format(preset=PRESET, **dict(wildcards.items()))


def settings(stage):
    """params: `-S key=<json>` for every setting the job reads, passed to `modiff` explicitly.

    The same string is the job's params entry, so changing any of these values reruns it.
    """

    def job(wildcards):
        keys = stage_of(stage).settings_for(wildcards.get("variant"))
        values = ((k, lookup(k)) for k in (_fill(k, wildcards) for k in keys))
        return " ".join(f"-S {shlex.quote(k + '=' + json.dumps(v))}" for k, v in values)

    return job


def inputs(stage):
    """input (to unpack): the job's data files and its code, the package files its subcommand
    can import (so a code change reruns exactly the affected stages)."""

    def job(wildcards):
        files = {}
        for name, path in stage_of(stage).inputs_for(wildcards.get("variant")).items():
            if isinstance(path, Each):
                wildcard, values = OVER[path.over]
                files[name] = expand(path.pattern, preset=PRESET, **{wildcard: values})
            else:
                files[name] = _fill(path, wildcards)
        files["code"] = list(code_deps(stage_of(stage).command))
        return files

    return job


def outputs(stage, **reported):
    """output: the stage's files, with its wildcards; ``reported`` wraps some in report()."""
    files = {k: v.replace("{preset}", PRESET) for k, v in stage_of(stage).outputs.items()}
    return {k: report(v, **reported[k]) if k in reported else v for k, v in files.items()}


def command(stage, extra=""):
    """shell: `modiff <command> <settings> <args>`, its output to the job's log."""
    s = stage_of(stage)
    args = s.args.replace("{variant}", "{wildcards.variant}").replace("{sigma}", "{wildcards.sigma}")
    return f"modiff {s.command} {{params.settings}} {args} {extra} > {{log}} 2>&1"
