"""params.yaml: loading, overrides and validation (one schema for the CLI, Snakemake and DVC)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).with_name("params.schema.yaml")


class ConfigError(ValueError):
    """params.yaml (or an override) is invalid; the message names the key and what is allowed."""


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def apply_overrides(params: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML), as ``dvc exp run -S`` does."""
    params = copy.deepcopy(params)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section of params.yaml")
            node = node[part]
        node[leaf] = yaml.safe_load(raw)
    return params


def _format_error(error: Any) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"{where}: {error.message}"


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check ``params`` against the schema and cross-key rules; ConfigError lists every problem."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    problems = [_format_error(e) for e in sorted(validator.iter_errors(params), key=str)]
    if not problems:
        problems += _semantic_problems(params)
    if problems:
        raise ConfigError("invalid params:\n  " + "\n  ".join(problems))
    return params


def _semantic_problems(params: dict[str, Any]) -> list[str]:
    from modiff.timesteps import timestep_sequence

    problems = []
    if params["preset"] not in params["presets"]:
        allowed = ", ".join(sorted(params["presets"]))
        problems.append(f"preset: unknown preset '{params['preset']}'; allowed: {allowed}")
    for name, preset in params["presets"].items():
        s, d = preset["sampling"], preset["diffusion"]
        try:
            timestep_sequence(s["steps"], s["skip_type"], d["num_diffusion_timesteps"])
        except ValueError as exc:
            problems.append(f"presets.{name}.sampling: {exc}")
        if not preset["calibration"]["cali_st"] < s["steps"]:
            problems.append(
                f"presets.{name}.calibration.cali_st must be below sampling.steps ({s['steps']})"
            )
        if preset["model"]["in_channels"] != preset["data"]["channels"]:
            problems.append(f"presets.{name}.model.in_channels must equal data.channels")
        batches = -(-s["n_samples"] // s["batch_size"])
        if s["shards"] > batches:
            problems.append(
                f"presets.{name}.sampling.shards ({s['shards']}) must not exceed the number of "
                f"batches ({batches}): a shard is made of whole batches"
            )
    for name, v in params["variants"].items():
        if v.get("a_granularity") == "per_sample" and v["a_scale"] != "dynamic":
            problems.append(f"variants.{name}: a_granularity per_sample needs a_scale dynamic")
            continue
        expected = variant_name(v)
        if name != expected:
            problems.append(f"variants: '{name}' must be named '{expected}' (its settings)")
    return problems


RECIPE_SUFFIXES = {"none": "", "layer": "-adaround", "block": "-brecq"}


def variant_name(v: dict[str, Any]) -> str:
    """fp32, or <method>-<scales>-w<bits>a<bits>[-adaround|-brecq][-lsq]: a variant's name, from
    its settings. <scales> is static, dynamic (per tensor, the paper's LTQ) or lcq (dynamic per
    sample); the suffixes: learned rounding per layer or block, learned step sizes."""
    if v["method"] == "fp32":
        return "fp32"
    recipe = RECIPE_SUFFIXES[v.get("reconstruction", "none")]
    recipe += "-lsq" if v.get("learn_act_scales") else ""
    return f"{v['method']}-{scale_kind(v)}-w{v['w_bits']}a{v['a_bits']}{recipe}"


def scale_kind(v: dict[str, Any]) -> str:
    """static, dynamic (per tensor: the paper's LTQ) or lcq (dynamic per sample), from a variant's
    settings or a metrics record."""
    return "lcq" if v.get("a_granularity") == "per_sample" else v["a_scale"]


def find_variant(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The entry of ``variants`` called ``name``."""
    if name not in params["variants"]:
        known = ", ".join(params["variants"]) or "none"
        raise ConfigError(f"unknown variant '{name}'; params.yaml's variants: {known}")
    return params["variants"][name]


def quantized_variants(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The grid's quantized variants by name (all but the FP32 reference)."""
    return {name: v for name, v in params["variants"].items() if v["method"] != "fp32"}


def shard_range(sampling: dict[str, Any], shard: int) -> range:
    """Image indices of sampling shard ``shard``: whole, globally fixed batches.

    A dynamic per-tensor scale depends on which images share a batch, so shards split the
    batch sequence, never a batch: merged shards equal one unsharded run bit for bit.
    """
    n, bs, shards = sampling["n_samples"], sampling["batch_size"], sampling["shards"]
    if not 0 <= shard < shards:
        raise ConfigError(f"shard {shard} out of range: sampling.shards is {shards}")
    batches = -(-n // bs)
    first, last = batches * shard // shards, batches * (shard + 1) // shards
    return range(first * bs, min(last * bs, n))


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read, override and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root or pass --params PATH")
    params = yaml.safe_load(path.read_text())
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return validate_params(apply_overrides(params, overrides))


def checkpoint_path(preset_name: str) -> Path:
    """Where the pipeline keeps a preset's verified checkpoint (one place, for both tools)."""
    return Path("data/checkpoints") / f"{preset_name}.ckpt"


def calibration_path(preset_name: str) -> Path:
    """Where the pipeline keeps a preset's calibration data (``modiff calib-data``)."""
    return Path("data/calibration") / f"{preset_name}.pt"


def preset_config(params: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """The named (default: selected) preset as a DDIM-layout config dict, with its ``name``."""
    name = name or params["preset"]
    if name not in params["presets"]:
        allowed = ", ".join(sorted(params["presets"]))
        raise ConfigError(f"unknown preset '{name}'; allowed: {allowed}")
    return {"name": name, **copy.deepcopy(params["presets"][name])}
