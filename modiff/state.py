"""The state protocol: modules that keep state across the steps of a trajectory.

A module that carries state from one call to the next (a quantized layer's modulation caches, a
compiled model's graph state) says so by a ``reset_cache()`` method; it may also report the
memory that state holds by a ``cache_bytes()`` method. The sampler resets every such module
before a new batch of trajectories, so it needs to know nothing about what keeps the state
(neither this module nor the sampler imports the quantization package).
"""

from __future__ import annotations

from torch import nn


def reset_caches(model: nn.Module) -> None:
    """Forget the trajectory: call ``reset_cache()`` on every submodule of ``model`` that has one
    (quantized layers, compiled models), so that the next call starts a new one."""
    for module in model.modules():
        if callable(getattr(module, "reset_cache", None)):
            module.reset_cache()


def cache_bytes(model: nn.Module) -> int:
    """Bytes held by the state of ``model``: the sum over its submodules that report it by a
    ``cache_bytes()`` method."""
    holders = [m for m in model.modules() if callable(getattr(m, "cache_bytes", None))]
    return sum(m.cache_bytes() for m in holders)
