"""Files that later steps trust: written under a temporary name, renamed only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_output(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` on success, else delete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A unique name rather than mkstemp, whose 0600 mode would stick to the final file.
    tmp_path = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(text: str, dest: str | Path) -> None:
    with atomic_output(dest) as tmp:
        tmp.write_text(text)


def write_json(data: Any, dest: str | Path) -> None:
    write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", dest)


def save_images(dest: str | Path, images: np.ndarray, **meta: Any) -> None:
    """Save uint8 images (N, H, W, C) and JSON metadata as one ``.npz``."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    with atomic_output(dest) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, images=images, meta=np.array(json.dumps(meta)))


SAMPLES_MADE_BY = "`modiff sample`, `modiff merge` or `modiff damage` (Snakemake: -R merge_samples)"


def load_images(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Inverse of :func:`save_images`. A missing, truncated or foreign file is an error that
    names it and the steps that make samples files, not a traceback from deep in numpy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} not found; make it with {SAMPLES_MADE_BY}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["images"], json.loads(str(f["meta"]))
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ValueError(
            f"{path} is not a complete modiff samples file ({reason}); delete it and rerun the "
            f"step that wrote it: {SAMPLES_MADE_BY}"
        ) from None


def load_tagged(path: str | Path, fmt: str, what: str, make_with: str) -> dict[str, Any]:
    """Load a modiff tensor file (``torch.load`` with ``weights_only``) of format ``fmt``.

    A missing file names the command that makes it; another format is a ValueError.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found; run `{make_with}`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ValueError(f"{path} is not a modiff {what} file ({fmt})")
    return blob
