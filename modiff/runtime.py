"""Process-wide settings every command applies the same way: logging, threads, device."""

from __future__ import annotations

import logging

import torch


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def set_threads(threads: int) -> None:
    """Fix intra-op threads: float sums (and so samples) are bit-exact only at equal threads."""
    torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; asking for absent CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available; use cpu/auto")
    return torch.device(name)
