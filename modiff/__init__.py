"""modiff: MoDiff error-compensated modulated quantization of diffusion models on native INT8."""

__version__ = "0.1.0"
