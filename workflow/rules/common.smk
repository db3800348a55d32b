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

# Package files run by a job are its inputs, so code changes rerun exactly the affected stages.
PKG = {
    name: f"modiff/{name}.py"
    for name in ("cli", "config", "fetch", "checkpoint", "diffusion", "io", "metrics", "classifier",
                 "plots", "runtime", "bench", "peers", "results", "report", "calibration", "data")
}
PKG["models"] = "modiff/models/unet.py"
PKG["schema"] = "modiff/params.schema.yaml"
PKG["quant"] = [f"modiff/quant/{m}.py" for m in ("api", "config", "fused", "kernels", "layers", "quantizer")]


def lookup(key):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def settings(*keys):
    """`-S key=<json>` for each dotted key: the rule's settings, passed explicitly to `modiff`.

    The same string is the params entry of the job, so changing any of these values reruns it.
    """
    return " ".join(f"-S {shlex.quote(k + '=' + json.dumps(lookup(k)))}" for k in keys)


# The sampler settings calibration depends on (the trajectories it records), not n_samples etc.:
# changing how many images are sampled must not redo the calibration.
CALIB_SAMPLING = ("sampling.steps", "sampling.skip_type", "sampling.eta")


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


def qparams(wildcards):
    """A quantized variant's parameters file (none for FP32)."""
    return [] if wildcards.variant == "fp32" else [f"data/quant/{wildcards.variant}.pt"]


def reference_samples(wildcards):
    """FP32 samples from the same x_T, for PSNR (not for FP32 itself)."""
    return [] if wildcards.name == "fp32" else ["results/samples/fp32.npz"]
