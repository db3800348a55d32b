"""QuantConfig: everything that decides how a model is quantized, in one small dataclass."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

from modiff import choices
from modiff.choices import AGranularity, AScale, Backend, Modulation, Reconstruction


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: bits, activation scales, backend, which layers.

    - ``a_scale``: ``static`` (one scale per layer input, searched on calibration data) or
      ``dynamic`` (computed from each tensor at run time).
    - ``a_granularity``: ``per_tensor``, or ``per_sample`` (dynamic only: one scale per image).
    - ``w_symmetric``: weights per output channel on a symmetric grid, or (``False``, as
      Q-Diffusion and MoDiff do) on an asymmetric one with a zero point per channel. 8-bit weights
      are symmetric either way (:attr:`symmetric_weights`).
    - ``backend``: ``native`` (oneDNN integer kernels, one call per layer, CPU), ``openvino``
      (the whole model compiled as one OpenVINO graph with integer convolutions, CPU; static
      scales), ``simulated`` (fake quantization in float, any device; the reference for both), or
      ``auto`` (:func:`modiff.quant.api.resolve_backend`: openvino where it can run the variant,
      else native; simulated on CUDA).
    - ``include``/``exclude``: fnmatch patterns over module names; by default every Conv2d and
      Linear is quantized (attention matmuls stay in float, as in the paper).
    - ``split_shortcut``: where the model declares a layer's input two parts joined along channels
      (:mod:`modiff.quant.surgery`), quantize the two parts separately (their ranges can differ
      widely).
    - ``modulation``: ``none`` (plain quantization), ``compensated`` (MoDiff: each layer
      quantizes the residual against its reconstructed input and accumulates its output) or
      ``uncompensated`` (residual against the true previous input: the paper's ablation).
    - ``warmup``: the first step of a trajectory under modulation: ``fp`` (full precision,
      the paper's default), ``quantized``, or ``repeat:k`` (a_T fed k times).
    - ``reconstruction``: ``none`` (nearest rounding), ``layer`` or ``block`` (AdaRound learned
      per layer, or per block the model declares a unit, as BRECQ and Q-Diffusion do), for
      ``reconstruction_iters`` Adam steps per unit on the calibration data.
    - ``learn_act_scales``: refine each static activation scale (for MoDiff: each residual
      scale, on the calibration pairs) LSQ-style after the MSE initialisation.
    """

    w_bits: int = choices.DEFAULT_BITS
    a_bits: int = choices.DEFAULT_BITS
    a_scale: AScale = choices.DEFAULT_A_SCALE
    backend: Backend = "native"
    a_granularity: AGranularity = choices.DEFAULT_A_GRANULARITY
    a_symmetric: bool = True
    w_symmetric: bool = False
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    split_shortcut: bool = True
    modulation: Modulation = "none"
    warmup: str = "fp"
    calib_batch_size: int = 256
    calib_max_values: int = 1 << 18  # values per layer input kept for the scale search
    reconstruction: Reconstruction = choices.DEFAULT_RECONSTRUCTION
    reconstruction_iters: int = choices.DEFAULT_RECONSTRUCTION_ITERS
    learn_act_scales: bool = False

    def __post_init__(self) -> None:
        choices.check_bits(self.w_bits, "w_bits")
        choices.check_bits(self.a_bits, "a_bits")
        _check_choice("a_scale", self.a_scale, AScale)
        _check_choice("backend", self.backend, Backend)
        _check_choice("a_granularity", self.a_granularity, AGranularity)
        _check_choice("modulation", self.modulation, Modulation)
        if self.a_granularity == "per_sample" and self.a_scale != "dynamic":
            raise ValueError("a_granularity 'per_sample' needs a_scale 'dynamic'")
        if self.a_granularity == "per_sample" and not self.a_symmetric:
            raise ValueError("a_granularity 'per_sample' needs a_symmetric (one zero point)")
        choices.check_warmup(self.warmup)
        _check_choice("reconstruction", self.reconstruction, Reconstruction)
        if not isinstance(self.reconstruction_iters, int) or self.reconstruction_iters < 0:
            raise ValueError(
                f"reconstruction_iters must be an integer >= 0, got {self.reconstruction_iters!r}"
            )
        if self.learn_act_scales and self.a_scale != "static":
            raise ValueError("learn_act_scales needs a_scale 'static' (dynamic: nothing to learn)")
        if self.calib_batch_size < 1 or self.calib_max_values < 1:
            raise ValueError("calib_batch_size and calib_max_values must be positive")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def selects(self, name: str) -> bool:
        """Whether the layer called ``name`` is quantized."""
        inc = any(fnmatch.fnmatchcase(name, p) for p in self.include)
        return inc and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    @property
    def symmetric_weights(self) -> bool:
        """Whether the weight grid is symmetric: as ``w_symmetric`` says below 8 bits; at 8 bits
        always, since asymmetric codes minus their zero point would not fit int8."""
        return self.w_symmetric or self.w_bits == 8

    @property
    def method(self) -> str:
        """The variant grid's method: qdiff (Q-Diffusion) or modiff (with MoDiff's modulation)."""
        return "qdiff" if self.modulation == "none" else "modiff"

    @property
    def learns(self) -> bool:
        """Whether calibration optimises on calibration data (reconstruction, learned scales)."""
        return self.reconstruction != "none" or self.learn_act_scales

    @property
    def needs_calibration(self) -> bool:
        """Whether calibration data is read: static scales are searched on it, learning uses it."""
        return self.a_scale == "static" or self.learns

    @property
    def recipe(self) -> str:
        """How the quantization parameters are found, in words (recorded with them)."""
        rounding = choices.RECONSTRUCTION_NAMES[self.reconstruction].recipe
        steps = ", learned step sizes (LSQ)" if self.learn_act_scales else ""
        iters = f" ({self.reconstruction_iters} iterations per unit)" if self.learns else ""
        return f"MSE scale search, {rounding}{steps}{iters}"

    @classmethod
    def from_variant(cls, variant: Any, quant: Any) -> QuantConfig:
        """The config of a grid variant (:class:`modiff.config.Variant`), built as params'
        ``quant`` section says (its backend and warm-up)."""
        return cls(
            w_bits=variant.w_bits,
            a_bits=variant.a_bits,
            a_scale=variant.a_scale,
            backend=quant.backend,
            a_granularity=variant.a_granularity,
            warmup=quant.warmup,
            modulation="compensated" if variant.method == "modiff" else "none",
            reconstruction=variant.reconstruction,
            reconstruction_iters=variant.reconstruction_iters,
            learn_act_scales=variant.learn_act_scales,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}; known {sorted(known)}")
        return cls(**data)


def _check_choice(name: str, value: str, choice: object) -> None:
    """``value`` must be one of the ``choice`` Literal's values (:mod:`modiff.choices`)."""
    allowed = choices.allowed(choice)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
