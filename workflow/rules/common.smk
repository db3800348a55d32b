# Shared helpers: how settings from `config` (params.yaml plus --config overrides) reach the CLI.
import json
import shlex

PRESET = config["preset"]
PRESET_CFG = config["presets"][PRESET]
# Package files a rule runs are inputs: code changes rerun exactly the affected stages.
PKG = {
    name: f"modiff/{name}.py"
    for name in ("cli", "config", "fetch", "checkpoint", "diffusion", "io", "metrics", "classifier", "plots", "runtime")
}
PKG["models"] = "modiff/models/unet.py"
PKG["schema"] = "modiff/params.schema.yaml"


def lookup(key):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def settings(*keys):
    """`-S key=<json>` for each dotted key: the rule's settings, passed explicitly to `modiff`.

    The same string is the rule's `params:` entry, so changing any of these values reruns it.
    """
    return " ".join(f"-S {shlex.quote(k + '=' + json.dumps(lookup(k)))}" for k in keys)


def preset_keys(*sections):
    return [f"presets.{PRESET}.{s}" for s in sections]
