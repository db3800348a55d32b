"""The pipeline's stages, one module each, named as ``modiff <command>`` names them.

Each module's ``run`` function takes the typed settings (:class:`modiff.config.Params`, when it
reads any) and the stage's files as keyword arguments named as in the stage table
(:data:`modiff.pipeline.STAGES`). Its code deps are the module's import closure, so a module
imports only what its stage runs.
"""

from __future__ import annotations

from typing import Any


def foreach_items(foreach: str, params: Any) -> list[str]:
    """The items a stage runs once per (``variants`` or ``sigmas``), as paths spell them.
    ``params``: the typed settings (:class:`modiff.config.Params`; not imported, so that a
    stage reading no settings does not depend on their code)."""
    if foreach == "variants":
        return list(params.variants)
    return [f"{sigma:g}" for sigma in params.damage_check.sigmas]


def expand(pattern: str, values: list[str]) -> list[str]:
    """The files of an input read together: ``pattern`` with its one wildcard (``{variant}`` or
    ``{sigma}``) set to each value, as the stage table passes it."""
    return [pattern.format_map({"variant": value, "sigma": value}) for value in values]
