"""params.yaml as typed settings: read once, validated, frozen.

Every allowed value, default and name grammar of the pipeline's settings is written here and
nowhere else: ``params.schema.json`` is generated from these models (``modiff
generate``), the Snakefile's wildcard constraints use :data:`VARIANT_NAME_PATTERN`, and the
command line's choices come from the same ``Literal`` types. Bits and the quantizer's own choices
and defaults are :mod:`modiff.choices`', which :class:`~modiff.quant.QuantConfig` shares.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modiff import choices
from modiff.choices import MAX_BITS, MIN_BITS, AGranularity, AScale, Backend, Reconstruction
from modiff.timesteps import SkipType, timestep_sequence

Method = Literal["fp32", "qdiff", "modiff"]
ScaleKind = Literal["static", "dynamic", "lcq"]  # lcq: dynamic per-sample scales
Device = Literal["auto", "cpu", "cuda"]
Peer = Literal["onnxruntime", "openvino", "pt2e"]
# Per preset, the FID feature extractors and reference sets it can use (the first: default).
FID_FEATURE_EXTRACTORS = {"digits": ("digits-classifier",), "cifar10": ("inception-v3-compat",)}
FID_REFERENCES = {"digits": ("digits",), "cifar10": ("cifar10-train", "cifar10-val")}
PresetName = Literal[tuple(FID_FEATURE_EXTRACTORS)]
FeatureExtractor = Literal[sum(FID_FEATURE_EXTRACTORS.values(), ())]
FidReference = Literal[sum(FID_REFERENCES.values(), ())]
# A variant name's recipe suffix, by ``reconstruction`` (learned rounding per layer or block).
RECIPE_SUFFIXES = {kind: names.suffix for kind, names in choices.RECONSTRUCTION_NAMES.items()}


class ConfigError(ValueError):
    """params.yaml (or an override) is invalid; the message names the key and what is allowed."""


class Settings(BaseModel):
    """A section of params.yaml: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _alternatives(values: Sequence[str]) -> str:
    return "|".join(values)  # plain words and hyphens: nothing to escape, in any regex dialect


# The grid's name grammar: fp32, or <method>-<scales>-w<bits>a<bits>[-adaround|-brecq][-lsq].
_BITS = f"[{MIN_BITS}-{MAX_BITS}]"
_SUFFIXES = _alternatives([s for s in RECIPE_SUFFIXES.values() if s])
VARIANT_NAME_PATTERN = (
    f"fp32|(?P<method>qdiff|modiff)-(?P<scales>{_alternatives(get_args(ScaleKind))})"
    f"-w(?P<w_bits>{_BITS})a(?P<a_bits>{_BITS})(?P<recipe>{_SUFFIXES})?(?P<lsq>-lsq)?"
)
# The same grammar without group names, for Snakemake's wildcard constraints and the schema.
VARIANT_NAME_REGEX = re.sub(r"\?P<\w+>", "", VARIANT_NAME_PATTERN)


class Variant(Settings):
    """One cell of the variant grid: how (and whether) the model is quantized."""

    method: Method = Field(description="fp32: the reference; qdiff: Q-Diffusion's scales; "
                           "modiff: with MoDiff's error-compensated modulation")  # fmt: skip
    a_scale: AScale = choices.DEFAULT_A_SCALE
    w_bits: int = Field(choices.DEFAULT_BITS, ge=MIN_BITS, le=MAX_BITS)
    a_bits: int = Field(choices.DEFAULT_BITS, ge=MIN_BITS, le=MAX_BITS)
    a_granularity: AGranularity = Field(
        choices.DEFAULT_A_GRANULARITY,
        description="dynamic scales per tensor (the paper's LTQ) or per sample (LCQ)",
    )
    reconstruction: Reconstruction = Field(
        choices.DEFAULT_RECONSTRUCTION,
        description="learned weight rounding: AdaRound per layer, or per block (BRECQ)",
    )
    reconstruction_iters: int = Field(choices.DEFAULT_RECONSTRUCTION_ITERS, ge=0,
                                      description="Adam steps per reconstructed unit")  # fmt: skip
    learn_act_scales: bool = Field(
        False, description="LSQ-refined static (MoDiff: residual) scales"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Variant:
        if self.method == "fp32" and self.model_fields_set - {"method"}:
            raise ValueError("fp32 is the unquantized reference: it takes no other settings")
        if self.a_granularity == "per_sample" and self.a_scale != "dynamic":
            raise ValueError("a_granularity per_sample needs a_scale dynamic")
        if self.learn_act_scales and self.a_scale != "static":
            raise ValueError("learn_act_scales needs a_scale static (dynamic: nothing to learn)")
        return self

    @property
    def scale_kind(self) -> ScaleKind:
        """static, dynamic (per tensor: the paper's LTQ) or lcq (dynamic per sample)."""
        return "lcq" if self.a_granularity == "per_sample" else self.a_scale

    @property
    def name(self) -> str:
        """The variant's name in the grid, from its settings (:data:`VARIANT_NAME_PATTERN`)."""
        if self.method == "fp32":
            return "fp32"
        recipe = RECIPE_SUFFIXES[self.reconstruction] + ("-lsq" if self.learn_act_scales else "")
        return f"{self.method}-{self.scale_kind}-w{self.w_bits}a{self.a_bits}{recipe}"

    @classmethod
    def from_name(cls, name: str) -> Variant:
        """The variant a grid name describes (default reconstruction iterations)."""
        match = re.fullmatch(VARIANT_NAME_PATTERN, name)
        if not match:
            raise ConfigError(
                f"'{name}' is not a variant name: fp32, or "
                "<qdiff|modiff>-<static|dynamic|lcq>-w<bits>a<bits>[-adaround|-brecq][-lsq]"
            )
        if name == "fp32":
            return cls(method="fp32")
        parts = match.groupdict()
        recipe = {suffix: kind for kind, suffix in RECIPE_SUFFIXES.items()}[parts["recipe"] or ""]
        try:
            return cls(
                method=parts["method"],
                a_scale="dynamic" if parts["scales"] == "lcq" else parts["scales"],
                a_granularity="per_sample" if parts["scales"] == "lcq" else "per_tensor",
                w_bits=int(parts["w_bits"]),
                a_bits=int(parts["a_bits"]),
                reconstruction=recipe,
                learn_act_scales=bool(parts["lsq"]),
            )
        except ValidationError as err:
            raise ConfigError(f"variant '{name}': {_problems(err)[0]}") from None


class QuantSettings(Settings):
    """How every quantized variant is built."""

    backend: Backend = Field(description="auto: openvino for static scales on a CPU with AVX2, "
                             "native otherwise, simulated on CUDA")  # fmt: skip
    warmup: str = Field(description="MoDiff's first step: fp, quantized or repeat:k")

    @model_validator(mode="after")
    def _known_warmup(self) -> QuantSettings:
        choices.check_warmup(self.warmup)
        return self


class DamageCheck(Settings):
    """FP32 samples plus Gaussian noise, scored like a variant: the metrics must see damage."""

    sigmas: tuple[float, ...] = Field(description="noise std on the [-1, 1] scale")

    @model_validator(mode="after")
    def _positive(self) -> DamageCheck:
        if any(s <= 0 for s in self.sigmas):
            raise ValueError("noise levels must be positive")
        return self


class BenchVariant(Settings):
    """A benchmark row on CIFAR-10's UNet: a grid variant on a backend, ``<name>@<backend>``."""

    variant: Variant
    backend: Backend

    @property
    def name(self) -> str:
        return f"{self.variant.name}@{self.backend}"

    @classmethod
    def from_name(cls, name: str) -> BenchVariant:
        variant, at, backend = name.partition("@")
        if not at or backend not in get_args(Backend):
            raise ConfigError(f"bench variant '{name}' is not <grid variant name>@<backend>, "
                              f"backend one of {get_args(Backend)}")  # fmt: skip
        return cls(variant=Variant.from_name(variant), backend=backend)


class Bench(Settings):
    """Per-step latency and memory, as ratios against FP32 measured in the same run."""

    batch_sizes: tuple[int, ...] = Field(min_length=1)
    repetitions: int = Field(ge=1)
    steps: int = Field(ge=2, description="model calls per timed trajectory (the first not counted)")
    cifar10: bool = Field(description="also time the CIFAR-10 UNet (random weights)")
    variants: tuple[str, ...] = Field(
        description="timed on the CIFAR-10 UNet: <grid variant name>@<backend>"
    )
    peers: tuple[Peer, ...] = Field(description="other engines on the same UNet")

    @model_validator(mode="after")
    def _valid(self) -> Bench:
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError("batch sizes must be positive")
        for name in self.variants:
            BenchVariant.from_name(name)
        if len(set(self.peers)) != len(self.peers):
            raise ValueError("peers must not repeat")
        return self


class Data(Settings):
    dataset: Literal["digits", "CIFAR10"]
    image_size: int = Field(ge=1)
    channels: int = Field(ge=1)
    rescaled: bool = True


class Model(Settings):
    """DDIM's UNet, in DDIM's config layout."""

    type: Literal["simple"]
    in_channels: int = Field(ge=1)
    out_ch: int = Field(ge=1)
    ch: int = Field(ge=32, multiple_of=32, description="GroupNorm uses 32 groups")
    ch_mult: tuple[int, ...] = Field(min_length=1)
    num_res_blocks: int = Field(ge=1)
    attn_resolutions: tuple[int, ...]
    dropout: float = Field(0.0, ge=0, lt=1)
    var_type: str | None = None
    ema_rate: float | None = None
    ema: bool | None = None
    resamp_with_conv: bool = True


class Diffusion(Settings):
    beta_schedule: Literal["linear", "quad", "const", "jsd", "sigmoid"]
    beta_start: float = Field(gt=0, lt=1)
    beta_end: float = Field(gt=0, lt=1)
    num_diffusion_timesteps: int = Field(ge=1)


class Training(Settings):
    iterations: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    seed: int = Field(ge=0)


class Checkpoint(Settings):
    source: str = Field(min_length=1, description="http(s) or file:// URL, or a path")
    md5: str | None = Field(None, pattern="^[0-9a-f]{32}$")
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _has_digest(self) -> Checkpoint:
        if not (self.md5 or self.sha256):
            raise ValueError("a checkpoint needs md5 or sha256 (a file is trusted by its digest)")
        return self


class Sampling(Settings):
    """DDIM sampling. Fields in params.yaml's order: sample files record them as given."""

    steps: int = Field(ge=1)
    skip_type: SkipType
    eta: float = Field(ge=0)
    batch_size: int = Field(ge=1)
    n_samples: int = Field(ge=1)
    shards: int = Field(ge=1, description="sampling jobs, each of whole batches")

    @model_validator(mode="after")
    def _whole_batches(self) -> Sampling:
        batches = -(-self.n_samples // self.batch_size)
        if self.shards > batches:
            raise ValueError(f"shards ({self.shards}) must not exceed the number of batches "
                             f"({batches}): a shard is made of whole batches")  # fmt: skip
        return self

    def shard_range(self, shard: int) -> range:
        """Image indices of sampling shard ``shard``: whole, globally fixed batches.

        A dynamic per-tensor scale depends on which images share a batch, so shards split the
        batch sequence, never a batch: merged shards equal one unsharded run bit for bit.
        """
        if not 0 <= shard < self.shards:
            raise ConfigError(f"shard {shard} out of range: sampling.shards is {self.shards}")
        batches = -(-self.n_samples // self.batch_size)
        first, last = batches * shard // self.shards, batches * (shard + 1) // self.shards
        return range(first * self.batch_size, min(last * self.batch_size, self.n_samples))


class Calibration(Settings):
    """Q-Diffusion's time-step-aware calibration data, drawn from FP32 trajectories."""

    cali_st: int = Field(ge=1, description="calibration steps: sampling steps kept, evenly spaced")
    cali_n: int = Field(ge=1, description="calibration trajectories: inputs per kept step")
    batch_size: int = Field(ge=1)


class Fid(Settings):
    feature_extractor: FeatureExtractor
    reference: FidReference
    classifier: str | None = None
    weights_path: str | None = Field(None, description="local Inception weights when offline")
    cifar10_root: str | None = Field(None, description="folder of cifar-10-python.tar.gz")


class Preset(Settings):
    """A model and everything about running it: data, UNet, schedule, checkpoint, sampler."""

    data: Data
    model: Model
    diffusion: Diffusion
    training: Training | None = None
    checkpoint: Checkpoint
    sampling: Sampling
    calibration: Calibration
    fid: Fid

    @model_validator(mode="after")
    def _consistent(self) -> Preset:
        timestep_sequence(self.sampling.steps, self.sampling.skip_type,
                          self.diffusion.num_diffusion_timesteps)  # fmt: skip
        if not self.calibration.cali_st < self.sampling.steps:
            raise ValueError(f"calibration.cali_st must be below sampling.steps "
                             f"({self.sampling.steps})")  # fmt: skip
        if self.model.in_channels != self.data.channels:
            raise ValueError("model.in_channels must equal data.channels")
        return self

    def layout(self, name: str) -> dict[str, Any]:
        """This preset as a DDIM-layout config dict with its ``name`` (what the model builder,
        the sampler and the metrics take); keys absent from params.yaml stay absent."""
        return {"name": name, **self.model_dump(mode="json", exclude_unset=True)}


class Params(Settings):
    """All of params.yaml."""

    preset: PresetName = Field(description="the selected entry of 'presets'")
    device: Device = Field(description="auto: cuda when present, else cpu")
    threads: int = Field(ge=1, description="torch intra-op threads per job")
    seed: int = Field(ge=0)
    variants: dict[str, Variant] = Field(description="the variant grid, keyed by name; fp32 (the "
                                         "reference of PSNR and speed) is required")  # fmt: skip
    quant: QuantSettings
    damage_check: DamageCheck
    bench: Bench
    presets: dict[PresetName, Preset]

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        problems = []
        if self.preset not in self.presets:
            problems.append(f"preset '{self.preset}' has no entry in presets")
        if "fp32" not in self.variants:
            problems.append("variants must hold fp32, the reference of PSNR and speed")
        for name, preset in self.presets.items():
            fid = preset.fid
            if fid.feature_extractor not in FID_FEATURE_EXTRACTORS[name]:
                problems.append(f"presets.{name}.fid.feature_extractor: {name} allows "
                                f"{', '.join(FID_FEATURE_EXTRACTORS[name])}")  # fmt: skip
            if fid.reference not in FID_REFERENCES[name]:
                problems.append(f"presets.{name}.fid.reference: {name} allows "
                                f"{', '.join(FID_REFERENCES[name])}")  # fmt: skip
        for name, variant in self.variants.items():
            if name != variant.name:
                problems.append(f"variants: '{name}' must be named '{variant.name}' (its settings)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @cached_property
    def selected(self) -> Preset:
        """The preset the pipeline runs."""
        return self.presets[self.preset]

    def preset_layout(self, name: str | None = None) -> dict[str, Any]:
        """The named (default: selected) preset in DDIM's config layout (:meth:`Preset.layout`)."""
        name = name or self.preset
        if name not in self.presets:
            raise ConfigError(f"unknown preset '{name}'; allowed: {', '.join(self.presets)}")
        return self.presets[name].layout(name)

    @property
    def quantized_variants(self) -> dict[str, Variant]:
        """The grid's quantized variants by name (all but the FP32 reference)."""
        return {name: v for name, v in self.variants.items() if v.method != "fp32"}

    def variant(self, name: str) -> Variant:
        """The entry of ``variants`` called ``name``."""
        if name not in self.variants:
            known = ", ".join(self.variants) or "none"
            raise ConfigError(f"unknown variant '{name}'; params.yaml's variants: {known}")
        return self.variants[name]


# --- reading -------------------------------------------------------------------------------------


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML), as ``dvc exp run -S`` does."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section of params.yaml")
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return raw


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (params.yaml's, or Snakemake's ``config``); ConfigError lists
    every problem with its dotted key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid params:\n  " + "\n  ".join(_problems(err))) from None


def _problems(err: ValidationError) -> list[str]:
    """Each error of ``err`` as ``dotted.key: what is wrong``."""
    problems = []
    for error in err.errors():
        message = error["msg"].removeprefix("Value error, ")
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {message}" if where else message)
    return problems


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read, override and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root or pass --params PATH")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return parse_params(apply_overrides(raw, overrides))


def json_schema() -> dict[str, Any]:
    """params.yaml's JSON schema, generated from :class:`Params` (for editors and readers)."""
    schema = Params.model_json_schema()
    schema["properties"]["variants"]["propertyNames"] = {"pattern": f"^({VARIANT_NAME_REGEX})$"}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "modiff params.yaml", **schema}  # fmt: skip
