"""Process-wide settings every command applies the same way: logging, threads, and where the
work runs (device and quantized backend, resolved once by :func:`resolve_execution`).

torch is imported where used: commands that never touch it (merge, grid, report) start fast.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import queue as queue_mod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def configure_process(threads: int) -> None:
    """What every torch command sets first: its thread count, and allocator reuse.

    Fixed threads because float sums (and so samples) are bit-exact only at equal threads.
    """
    import torch

    torch.set_num_threads(threads)
    keep_freed_memory()


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def keep_freed_memory() -> None:
    """Make glibc keep freed blocks for reuse instead of returning them to the OS at once.

    A diffusion step frees and re-allocates the same large activations a hundred times; by
    default glibc serves large blocks by mmap and unmaps them on free, so every fresh tensor
    pays its page faults again (measured here: a 1x1 int8 conv on 16x128x32x32 took 1.0-1.25 ms
    with a fresh output buffer, 0.33 ms with reused memory).
    Applies to the whole process, FP32 and quantized models alike. No-op without glibc.
    """
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters from <malloc.h>
    libc, big = _glibc(), 2**31 - 1
    if libc is None:
        return
    if not (libc.mallopt(m_mmap_threshold, big) and libc.mallopt(m_trim_threshold, big)):
        log.debug("mallopt refused the settings; freed memory goes back to the OS")


def release_freed_memory() -> None:
    """Hand memory freed so far back to the OS (glibc's malloc_trim); no-op without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; asking for absent CUDA is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available; use cpu/auto")
    return torch.device(name)


@dataclass(frozen=True)
class Execution:
    """Where a command's model runs: the device, and for a quantized model its backend."""

    device: torch.device
    backend: str | None  # None: a float model

    def describe(self) -> str:
        return f"{'FP32' if self.backend is None else self.backend + ' backend'} on {self.device}"


def resolve_execution(device: str, backend: str | None = None) -> Execution:
    """The one place that decides where models run, from params.yaml's ``device`` and a
    quantized model's ``backend`` (None for FP32).

    The integer backends (native, openvino) are CPU backends: on CUDA a quantized model runs the
    simulated backend (the same quantization, in float), and every record names it so. ``auto``
    on the CPU is resolved when the model is built (:func:`modiff.quant.api.resolve_backend`).
    """
    resolved = resolve_device(device)
    if backend in ("native", "openvino", "auto") and resolved.type != "cpu":
        if backend != "auto":  # auto chooses simulated there itself
            log.warning(
                "the %s backend's int8 kernels run on the CPU only: on %s this model runs the "
                "'simulated' backend (fake quantization in float); records name it so",
                backend,
                resolved,
            )
        backend = "simulated"
    execution = Execution(resolved, backend)
    log.info("running %s (device setting %r)", execution.describe(), device)
    return execution


def _child(fn: Callable, args: tuple, queue: Any) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except Exception as err:  # handed to the parent, which raises it with the reason
        queue.put(("error", f"{type(err).__name__}: {err}"))


def in_fresh_process(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a spawned process (``fn`` and ``args`` picklable): a clean memory
    baseline, and a crash of native code (another engine's) that cannot take this process with
    it. Raises RuntimeError with the reason when ``fn`` raises or the process dies."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    while True:
        try:
            status, value = queue.get(timeout=1.0)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"process died (exit code {proc.exitcode})") from None
    proc.join()
    if status == "error":
        raise RuntimeError(value)
    return value
