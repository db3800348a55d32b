"""Safe checkpoint I/O: tensors only (``weights_only=True``), strict fit checks, atomic saves."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from modiff.io import atomic_output

_LIST_LIMIT = 10  # entries shown per category in error messages


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, not a plain state dict, or does not fit the model."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a bare state dict (str -> Tensor) onto the CPU, refusing anything that is not one.

    ``weights_only=True`` keeps torch.load from running code embedded in the pickle; nested
    layouts (e.g. ``{"state_dict": ...}``) are refused rather than guessed at.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint and was refused for safety "
            f"(torch.load with weights_only=True): {_unpickling_reason(exc)}"
        ) from exc
    except (RuntimeError, EOFError) as exc:  # e.g. a truncated or corrupt zip archive
        raise CheckpointError(
            f"cannot read checkpoint {path} (corrupt or truncated?): {exc}"
        ) from exc
    return _as_state_dict(payload, str(path))


def load_into(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor] | str | Path
) -> torch.nn.Module:
    """Load ``state`` (a state dict or a checkpoint path) into ``model`` strictly; return it.

    Keys and shapes are compared first so that a mismatch is reported in full, as a config
    problem, instead of as torch's first failing parameter.
    """
    if isinstance(state, str | Path):
        source = str(state)
        state = load_state_dict(state)
    else:
        source = "state dict"
        state = _as_state_dict(state, source)
    problems = _mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit the model:\n"
            + "\n".join(problems)
            + "\nThe checkpoint was made for a different model config (wrong preset or config?)."
        )
    model.load_state_dict(state, strict=True)
    return model


def save_state_dict(
    model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], path: str | Path
) -> Path:
    """Save a model's (or a given) state dict to ``path`` atomically; return ``path``.

    The file is written next to ``path`` and moved into place, so a crash never leaves a
    half-written checkpoint under the final name.
    """
    path = Path(path)
    if isinstance(model_or_state, torch.nn.Module):
        state = model_or_state.state_dict()
    else:
        state = _as_state_dict(model_or_state, "state dict")
    # Detached CPU tensors keep the file loadable anywhere and free of autograd state.
    state = {key: tensor.detach().cpu() for key, tensor in state.items()}
    # Saving to a file object keeps the temp name out of the zip records: same tensors, same bytes.
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)
    return path


def _as_state_dict(payload: object, source: str) -> dict[str, torch.Tensor]:
    """``payload`` as a plain dict if it maps str -> Tensor; CheckpointError otherwise."""
    expected = "expected a bare state dict mapping parameter names to tensors"
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{source}: {expected}, found {type(payload).__name__}")
    bad = [
        f"{key!r} ({type(value).__name__})"
        for key, value in payload.items()
        if not (isinstance(key, str) and isinstance(value, torch.Tensor))
    ]
    if bad:
        raise CheckpointError(f"{source}: {expected}, found non-tensor entries: {_truncated(bad)}")
    if not payload:
        raise CheckpointError(f"{source}: {expected}, found an empty mapping")
    return dict(payload)


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """The informative sentence of torch's long weights-only error (e.g. the refused global)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        return text.split(marker, 1)[1].strip().split(". ", 1)[0]
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _mismatches(
    model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> list[str]:
    """Human-readable lines for missing keys, unexpected keys and shape mismatches."""
    missing = [key for key in model_state if key not in state]
    unexpected = [key for key in state if key not in model_state]
    shapes = [
        f"{key}: checkpoint {_shape(state[key])} vs model {_shape(model_state[key])}"
        for key in model_state
        if key in state and state[key].shape != model_state[key].shape
    ]
    lines = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            lines.append(f"  {label} ({len(items)}): {_truncated(items)}")
    return lines


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(size) for size in tensor.shape) + ")"


def _truncated(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return shown + (f", ... and {more} more" if more > 0 else "")


def load_model(preset: dict[str, Any], path: str | Path, device: Any = "cpu") -> torch.nn.Module:
    """The preset's model (a preset layout, :meth:`modiff.config.Preset.layout`) with the
    checkpoint at ``path``, verified against the digest params.yaml gives; in eval mode."""
    from modiff.fetch import verified_checkpoint
    from modiff.models import build_model

    model = load_into(build_model(preset), verified_checkpoint(path, preset))
    return model.eval().to(device)
