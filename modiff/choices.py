"""The allowed values and defaults of every quantization choice, written once.

A leaf module (no torch, no package imports): the quantizer (:class:`modiff.quant.QuantConfig`)
and the pipeline's settings (:mod:`modiff.config`) both take their choices from here, so that
reading settings does not load, or depend on, the quantization code.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

AScale = Literal["static", "dynamic"]
Backend = Literal["auto", "native", "openvino", "simulated"]
AGranularity = Literal["per_tensor", "per_sample"]  # per_sample: one dynamic scale per image
Modulation = Literal["none", "compensated", "uncompensated"]
Reconstruction = Literal["none", "layer", "block"]


class ReconstructionNames(NamedTuple):
    """How a reconstruction is named: in a grid variant's name, in the report's rows, and in
    the recipe recorded with the quantization parameters."""

    suffix: str
    label: str
    recipe: str


RECONSTRUCTION_NAMES: dict[str, ReconstructionNames] = {
    "none": ReconstructionNames("", "PTQ (nearest rounding)", "nearest rounding"),
    "layer": ReconstructionNames(
        "-adaround", "Q-Diffusion (AdaRound per layer)", "AdaRound per layer"
    ),  # fmt: skip
    "block": ReconstructionNames("-brecq", "Q-Diffusion (BRECQ)", "AdaRound per block (BRECQ)"),
}

MIN_BITS, MAX_BITS = 2, 8  # the integer kernels take 8-bit operands; below 2 bits is no grid
DEFAULT_BITS = 8
DEFAULT_A_SCALE: AScale = "static"
DEFAULT_A_GRANULARITY: AGranularity = "per_tensor"
DEFAULT_RECONSTRUCTION: Reconstruction = "none"
DEFAULT_RECONSTRUCTION_ITERS = 2000


def allowed(choice: object) -> tuple[str, ...]:
    """A choice's allowed values, e.g. ``allowed(Backend)``."""
    return get_args(choice)


def check_bits(bits: int, what: str) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def check_warmup(warmup: str) -> None:
    """MoDiff's first step: ``fp``, ``quantized`` or ``repeat:k`` (k >= 1)."""
    mode, _, repeats = warmup.partition(":")
    repeat = mode == "repeat" and repeats.isdigit() and int(repeats) > 0
    if not (warmup in ("fp", "quantized") or repeat):
        raise ValueError(f"warmup must be 'fp', 'quantized' or 'repeat:k' (k >= 1), got {warmup!r}")
