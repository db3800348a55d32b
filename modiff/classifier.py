"""A small CNN classifier for the 8x8 digits preset, and its torch-fidelity feature extractor.

Inception-v3 features are meaningless on 8x8 grayscale digits, so the digits preset measures
FID/KID in the penultimate feature space of this classifier (as is customary for MNIST-like data).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from modiff.data import digits_images, digits_labels, uint8_to_model_space
from modiff.io import atomic_output, write_json

FEATURE_EXTRACTOR_NAME = "digits-classifier"
NUM_CLASSES = 10
IMAGE_SIZE = 8
FEATURE_DIM = 128
TEST_FRACTION = 0.2
DEFAULT_EPOCHS = 30


class DigitsClassifier(nn.Module):
    """conv 32 -> conv 64 -> max-pool -> fc 128 + BN ("features") -> fc 10, on 1x8x8 in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(64 * (IMAGE_SIZE // 2) ** 2, FEATURE_DIM)
        # BatchNorm before the ReLU keeps every feature unit alive and O(1): without it about half
        # the units die (singular FID covariance) and KID's default polynomial kernel, which
        # assumes O(1) features, is blown up by large activations.
        self.bn1 = nn.BatchNorm1d(FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 128), the embedding used for FID/KID."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.bn1(self.fc1(torch.flatten(x, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.fc2(self.dropout(self.features(x)))


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) indices into :func:`digits_images`; deterministic in ``seed``."""
    from sklearn.model_selection import train_test_split  # training only: FID jobs skip it

    idx = np.arange(len(digits_labels()))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, random_state=seed, stratify=digits_labels()
    )
    return np.sort(train_idx), np.sort(test_idx)


def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel per axis, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n)[:, None, None]
    # Advanced indices around the channel slice put the channel last: (N, H, W, C).
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch and BLAS on one thread for tiny workloads like this 8x8 network.

    They gain nothing from intra-op threads, OpenMP/OpenBLAS spin-waits are several times slower
    on busy shared cores, and results stop depending on the machine's core count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # threadpoolctl ships with scikit-learn; it caps numpy's BLAS (FID/KID linear algebra).
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return int((model(x).argmax(dim=1) == y).sum()) / len(y)


def classifier_accuracy(model: DigitsClassifier, seed: int = 0) -> float:
    """Accuracy of ``model`` on the held-out part of the digits split made with ``seed``."""
    _, test_idx = digits_split(seed)
    x = uint8_to_model_space(digits_images()[test_idx])
    y = torch.from_numpy(digits_labels()[test_idx])
    return _accuracy(model, x, y)


def train_classifier(
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    out: Path | str | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train :class:`DigitsClassifier` on a stratified 80/20 split; optionally save it to ``out``.

    Seeded end to end (weights, shuffling and augmentation), so a rerun gives the same weights.
    """
    start = time.perf_counter()
    with single_threaded():
        model, test_accuracy, n_train, n_test = _fit(seed, epochs, batch_size, lr)
    metrics = {
        "test_accuracy": test_accuracy,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "epochs": epochs,
        "train_seconds": round(time.perf_counter() - start, 3),
    }
    if out is not None:
        save_classifier(model, out, metrics)
    return model, metrics


def _fit(
    seed: int, epochs: int, batch_size: int, lr: float
) -> tuple[DigitsClassifier, float, int, int]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = digits_split(seed)
    images, labels = digits_images(), torch.from_numpy(digits_labels())
    x_train, y_train = uint8_to_model_space(images[train_idx]), labels[train_idx]
    x_test, y_test = uint8_to_model_space(images[test_idx]), labels[test_idx]

    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), batch_size):
            b = perm[i : i + batch_size]
            loss = F.cross_entropy(model(_random_shift(x_train[b], gen)), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    return model.eval(), _accuracy(model, x_test, y_test), len(train_idx), len(test_idx)


def save_classifier(model: DigitsClassifier, out: Path | str, metrics: dict[str, Any]) -> None:
    """Save the state_dict to ``out`` and ``metrics`` to the sidecar ``<out>.json``, atomically."""
    out = Path(out)
    # Saving to a file object keeps the temp name out of the zip records: same weights, same bytes.
    with atomic_output(out) as tmp, open(tmp, "wb") as fh:
        torch.save(model.state_dict(), fh)
    write_json(metrics, out.with_name(out.name + ".json"))


def load_classifier(path: Path | str) -> DigitsClassifier:
    """Load weights saved by :func:`train_classifier` (strict) into a CPU model in eval mode."""
    model = DigitsClassifier()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def predict_labels(
    model: DigitsClassifier, images_uint8: np.ndarray, batch_size: int = 1024
) -> np.ndarray:
    """Predicted classes (N,) int64 of uint8 images (N, 8, 8, 1)."""
    model.eval()
    device = next(model.parameters()).device
    preds = [
        model(uint8_to_model_space(images_uint8[i : i + batch_size]).to(device)).argmax(dim=1)
        for i in range(0, len(images_uint8), batch_size)
    ]
    if not preds:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(preds).cpu().numpy().astype(np.int64)


def class_histogram(model: DigitsClassifier, images_uint8: np.ndarray) -> list[int]:
    """Images predicted as each class 0..9 (mode collapse shows up as a skewed histogram)."""
    counts = np.bincount(predict_labels(model, images_uint8), minlength=NUM_CLASSES)
    return [int(c) for c in counts]


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor wrapping a trained :class:`DigitsClassifier`.

    torch-fidelity constructs it as ``cls(name, features_list, **calculate_metrics_kwargs)`` and
    feeds uint8 batches (N, C, 8, 8); the weights come from ``feature_extractor_weights_path``.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                f"feature extractor {name!r} needs feature_extractor_weights_path "
                "(a state_dict saved by modiff.classifier.train_classifier)"
            )
        self.net = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        # ISC needs class logits; the distribution metrics use the penultimate embedding.
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # tiny network: compiling costs more than it saves

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros((1, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
            raise ValueError("expected a uint8 tensor N x C x H x W")
        if x.shape[1] not in (1, 3) or tuple(x.shape[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"expected N x 1 (or 3) x 8 x 8 images, got {tuple(x.shape)}")
        # Grayscale loaded as RGB has three equal channels; channel 0 is the image.
        x = x[:, :1].float() / 255.0 * 2.0 - 1.0
        feats = self.net.features(x)
        out = {"features": feats, "logits": self.net.fc2(feats)}
        return tuple(out[name].float() for name in self.features_list)


def register_digits_feature_extractor() -> None:
    """Register :class:`DigitsFeatureExtractor` with torch-fidelity; safe to call repeatedly."""
    current = FEATURE_EXTRACTORS_REGISTRY.get(FEATURE_EXTRACTOR_NAME)
    if current is DigitsFeatureExtractor:
        return
    if current is not None:
        if current.__qualname__ != DigitsFeatureExtractor.__qualname__ or (
            current.__module__ != DigitsFeatureExtractor.__module__
        ):
            raise ValueError(f"{FEATURE_EXTRACTOR_NAME!r} is already registered to {current!r}")
        # Same class from a reloaded module: point the registry at the live one.
        FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_NAME] = DigitsFeatureExtractor
        return
    register_feature_extractor(FEATURE_EXTRACTOR_NAME, DigitsFeatureExtractor)


register_digits_feature_extractor()
