# Shared helpers: how settings from `config` (params.yaml plus --config overrides) reach the CLI.
import json
import shlex

PRESET = config["preset"]
PRESET_CFG = config["presets"][PRESET]
SAMPLING = PRESET_CFG["sampling"]
VARIANTS = [v["name"] for v in config["variants"]]  # quantized; "fp32" is the reference
ALL_VARIANTS = ["fp32", *VARIANTS]
SHARDS = range(SAMPLING["shards"])
DAMAGED = [f"fp32-noise{sigma:g}" for sigma in config["damage_check"]["sigmas"]]

wildcard_constraints:
    variant="fp32|(qdiff|modiff)-(static|dynamic)-w[2-8]a[2-8]",
    shard=r"\d+",
    sigma=r"[0-9.e-]+",
    name=r"fp32(-noise[0-9.e-]+)?|(qdiff|modiff)-(static|dynamic)-w[2-8]a[2-8]",

# Package files a rule runs are inputs: code changes rerun exactly the affected stages.
PKG = {
    name: f"modiff/{name}.py"
    for name in ("cli", "config", "fetch", "checkpoint", "diffusion", "io", "metrics", "classifier",
                 "plots", "runtime", "bench", "results", "report")
}
PKG["models"] = "modiff/models/unet.py"
PKG["schema"] = "modiff/params.schema.yaml"
PKG["quant"] = [f"modiff/quant/{m}.py" for m in ("api", "calibration", "config", "fused", "kernels", "layers", "quantizer")]


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


def variant_settings(wildcards):
    """The variant's own grid entry, as `-S variants=[entry]` (other variants do not rerun it)."""
    entry = [v for v in config["variants"] if v["name"] == wildcards.variant]
    return f"-S {shlex.quote('variants=' + json.dumps(entry))}"


def code(*names):
    files = []
    for name in names:
        files += PKG[name] if isinstance(PKG[name], list) else [PKG[name]]
    return files
