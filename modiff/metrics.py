"""Sample-quality metrics: FID/KID through torch-fidelity, and per-image PSNR.

* ``digits``: features of the bundled digits classifier (``digits-classifier`` extractor), against
  all 1,797 scikit-learn digits as the reference; no download needed.
* ``cifar10``: the standard Inception-v3 features against torch-fidelity's ``cifar10-train`` input.
  Both the Inception weights and the CIFAR-10 archive are downloads, so availability is checked up
  front and a machine without internet gets :class:`MetricsOfflineError` with instructions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import urllib.error
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)
from torchvision.datasets import CIFAR10

from modiff.classifier import (
    register_digits_feature_extractor,
    single_threaded,
)
from modiff.config import FID_FEATURE_EXTRACTORS, FID_REFERENCES
from modiff.data import digits_images
from modiff.errors import UserError
from modiff.fetch import file_digest

FID_CACHE = Path("data/fid_cache")  # reference statistics: computed once, checked when read
PRESETS = tuple(FID_FEATURE_EXTRACTORS)
KID_MAX_SUBSET = 1000
DNS_TIMEOUT_S = 2.0
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILE = os.path.basename(urlparse(URL_INCEPTION_V3).path)


class MetricsOfflineError(UserError, RuntimeError):
    """A file the metric needs is neither available locally nor downloadable (no network)."""


class UInt8ImageDataset(Dataset):
    """uint8 images (N, H, W, C) served as the uint8 C x H x W tensors torch-fidelity expects."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = (
            torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def compute_fid(
    samples: np.ndarray,
    *,
    preset: str,
    fid_config: dict[str, Any],
    cache_dir: Path | str,
    kid: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """FID (and KID) of uint8 ``samples`` (N, H, W, C) against the preset's reference set.

    Reference features/statistics are cached by torch-fidelity under ``cache_dir``; the samples'
    never are. Returns ``fid``, ``kid``, ``kid_std`` (NaN when ``kid`` is False), ``n_samples``,
    ``reference`` and ``feature_extractor``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    _validate_samples(samples)
    cuda, device_ctx = _resolve_device(device)
    extractor = fid_config.get("feature_extractor", FID_FEATURE_EXTRACTORS[preset][0])
    if extractor not in FID_FEATURE_EXTRACTORS[preset]:
        allowed = ", ".join(FID_FEATURE_EXTRACTORS[preset])
        raise ValueError(
            f"unknown feature extractor {extractor!r} for {preset}; allowed: {allowed}"
        )
    reference = fid_config.get("reference", FID_REFERENCES[preset][0])
    if reference not in FID_REFERENCES[preset]:
        allowed = ", ".join(FID_REFERENCES[preset])
        raise ValueError(f"unknown reference {reference!r} for {preset}; allowed: {allowed}")

    if preset == "digits":
        kwargs, n_ref = _digits_kwargs(samples, fid_config, reference)
    else:
        kwargs, n_ref = _cifar10_kwargs(samples, fid_config, reference, cache_dir, kid)

    kwargs.update(
        input1=UInt8ImageDataset(samples),
        feature_extractor=extractor,
        fid=True,
        kid=kid,
        # KID draws subsets without replacement from both sets.
        kid_subset_size=min(KID_MAX_SUBSET, len(samples), n_ref),
        cuda=cuda,
        cache=True,
        cache_root=str(cache_dir),
        verbose=False,
    )
    with device_ctx:
        if preset == "digits":
            with single_threaded():
                out = torch_fidelity.calculate_metrics(**kwargs)
        else:
            out = _calculate_online(kwargs)
    return {
        "fid": float(out[torch_fidelity.KEY_METRIC_FID]),
        "kid": float(out[torch_fidelity.KEY_METRIC_KID_MEAN]) if kid else float("nan"),
        "kid_std": float(out[torch_fidelity.KEY_METRIC_KID_STD]) if kid else float("nan"),
        "n_samples": int(len(samples)),
        "reference": reference,
        "feature_extractor": extractor,
    }


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB (data range 255) between uint8 arrays of equal shape (N, ...).

    Identical images give ``inf``.
    """
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"psnr expects uint8 arrays, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"psnr expects two arrays of the same shape (N, ...), got {a.shape}, {b.shape}"
        )
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.mean(diff**2, axis=tuple(range(1, a.ndim)))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / mse)


def inception_weights_cache_path() -> Path:
    """Where torch-fidelity downloads the Inception weights to ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def default_datasets_root() -> Path:
    """torch-fidelity's default root for registered inputs such as ``cifar10-train``."""
    # Same private helper torch-fidelity itself calls, so the two never disagree.
    return Path(torch.hub._get_torch_home()) / "fidelity_datasets"


def host_resolvable(host: str, timeout: float = DNS_TIMEOUT_S) -> bool:
    """Whether DNS resolves ``host`` within ``timeout`` seconds (a cheap "are we online" probe)."""
    result: list[bool] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo has no timeout of its own; a daemon thread keeps a hung resolver from blocking.
    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _validate_samples(samples: Any) -> None:
    if not isinstance(samples, np.ndarray):
        raise ValueError(f"samples must be a numpy array, got {type(samples).__name__}")
    if samples.dtype != np.uint8:
        raise ValueError(f"samples must be uint8, got {samples.dtype}")
    if samples.ndim != 4:
        raise ValueError(f"samples must be 4-D (N, H, W, C), got shape {samples.shape}")
    if samples.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples, got {samples.shape[0]}")


def _resolve_device(device: str) -> tuple[bool, contextlib.AbstractContextManager[Any]]:
    """(cuda flag for torch-fidelity, context selecting the GPU): it only knows "cuda" or not."""
    if device == "cpu":
        return False, contextlib.nullcontext()
    if device == "cuda":
        return True, contextlib.nullcontext()
    if device.startswith("cuda:") and device[5:].isdigit():
        return True, torch.cuda.device(int(device[5:]))
    raise ValueError(f"unknown device {device!r}; allowed: cpu, cuda, cuda:<index>")


def _digits_kwargs(
    samples: np.ndarray, fid_config: dict[str, Any], reference: str
) -> tuple[dict[str, Any], int]:
    if samples.shape[1:3] != (8, 8) or samples.shape[3] not in (1, 3):
        raise ValueError(f"digits samples must be (N, 8, 8, 1), got shape {samples.shape}")
    weights = Path(fid_config.get("classifier", ""))
    if not weights.is_file():
        raise FileNotFoundError(
            f"digits classifier weights not found at {str(weights)!r} (fid.classifier); "
            "train them with modiff.classifier.train_classifier(out=...)"
        )
    register_digits_feature_extractor()
    ref = digits_images()
    # The key follows the classifier's weights and the reference images themselves (as the
    # data code makes them today): either changing gives new statistics, never stale ones.
    images_digest = hashlib.sha256(repr(ref.shape).encode() + ref.tobytes()).hexdigest()
    kwargs = {
        "input2": UInt8ImageDataset(ref),
        "input2_cache_name": (
            f"{reference}-full-{file_digest(weights, 'sha256')[:16]}-{images_digest[:16]}"
        ),
        "feature_extractor_weights_path": str(weights),
        # In-memory 8x8 images: DataLoader worker processes would cost more than they save.
        "save_cpu_ram": True,
    }
    return kwargs, len(ref)


def _cifar10_kwargs(
    samples: np.ndarray,
    fid_config: dict[str, Any],
    reference: str,
    cache_dir: Path | str,
    kid: bool,
) -> tuple[dict[str, Any], int]:
    if samples.shape[3] != 3:
        raise ValueError(f"cifar10 samples must be RGB (N, H, W, 3), got shape {samples.shape}")
    weights_path = fid_config.get("weights_path")
    if weights_path is not None and not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {weights_path!r} (fid.weights_path)"
        )
    root = fid_config.get("cifar10_root")
    datasets_root = Path(root) if root is not None else default_datasets_root()
    _check_cifar10_offline(weights_path, datasets_root, reference, Path(cache_dir), kid)
    kwargs = {
        "input2": reference,
        "feature_extractor_weights_path": None if weights_path is None else str(weights_path),
        "datasets_root": str(datasets_root),
    }
    return kwargs, 50000 if reference == "cifar10-train" else 10000


def _cifar10_data_present(root: Path) -> bool:
    """torchvision's CIFAR10 uses the extracted batches, or extracts the archive itself."""
    batches = root / CIFAR10.base_folder
    names = [name for name, _md5 in CIFAR10.train_list + CIFAR10.test_list]
    extracted = all((batches / name).is_file() for name in names)
    return extracted or (root / CIFAR10.filename).is_file()


def _cifar10_reference_cached(cache_dir: Path, reference: str, kid: bool) -> bool:
    """Whether torch-fidelity can skip CIFAR-10 because its features/statistics are cached."""
    layer = FeatureExtractorInceptionV3.get_default_feature_layer_for_metric("fid")
    prefix = f"{reference}-inception-v3-compat"
    features = (cache_dir / f"{prefix}-features-{layer}.pt").is_file()
    stats = (cache_dir / f"{prefix}-stat-fid-{layer}.pt").is_file()
    # KID needs the reference features themselves; FID alone is satisfied by the statistics.
    return features or (stats and not kid)


def _weights_instructions() -> str:
    return (
        f"Inception-v3 weights {INCEPTION_WEIGHTS_FILE} are not available: download\n"
        f"  {INCEPTION_WEIGHTS_URL}\n"
        "on a machine with internet, then either set the params key fid.weights_path to the file "
        "(passed to torch-fidelity as feature_extractor_weights_path) or copy it to\n"
        f"  {inception_weights_cache_path()}\n"
        "(torch.hub's checkpoint cache, $TORCH_HOME/hub/checkpoints)."
    )


def _cifar10_instructions(root: Path) -> str:
    return (
        f"CIFAR-10 is not available under {root}: download\n"
        f"  {CIFAR10.url}\n"
        f"and put {CIFAR10.filename} (or its extracted {CIFAR10.base_folder}/ folder) in a "
        "directory, then set the params key fid.cifar10_root to that directory (passed to "
        "torch-fidelity as datasets_root; its default is $TORCH_HOME/fidelity_datasets = "
        f"{default_datasets_root()})."
    )


def _check_cifar10_offline(
    weights_path: str | None, datasets_root: Path, reference: str, cache_dir: Path, kid: bool
) -> None:
    """Raise MetricsOfflineError before any work if a needed download cannot happen."""
    problems = []
    if weights_path is None and not inception_weights_cache_path().is_file():
        if not host_resolvable(urlparse(INCEPTION_WEIGHTS_URL).hostname or ""):
            problems.append(_weights_instructions())
    if not _cifar10_data_present(datasets_root) and not _cifar10_reference_cached(
        cache_dir, reference, kid
    ):
        if not host_resolvable(urlparse(CIFAR10.url).hostname or ""):
            problems.append(_cifar10_instructions(datasets_root))
    if problems:
        raise MetricsOfflineError("cifar10 FID cannot run offline.\n" + "\n".join(problems))


def _calculate_online(kwargs: dict[str, Any]) -> dict[str, Any]:
    """calculate_metrics; a failed download (DNS up, network down) becomes MetricsOfflineError."""
    try:
        return torch_fidelity.calculate_metrics(**kwargs)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        root = Path(kwargs["datasets_root"])
        raise MetricsOfflineError(
            f"a download failed ({e}).\n{_weights_instructions()}\n{_cifar10_instructions(root)}"
        ) from e
