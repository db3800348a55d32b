"""FID/KID through torch-fidelity (digits preset, cifar10 offline handling) and PSNR."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch

from modiff import metrics
from modiff.classifier import load_classifier, single_threaded, train_classifier
from modiff.data import digits_images, uint8_to_model_space
from modiff.fetch import file_digest
from modiff.metrics import MetricsOfflineError, compute_fid, psnr

CLASSIFIER = Path(__file__).resolve().parents[1] / "data" / "pretrained" / "digits_classifier.pt"
DIGITS_CFG = {
    "feature_extractor": "digits-classifier",
    "classifier": str(CLASSIFIER),
    "reference": "digits",
}
CIFAR_CFG = {
    "feature_extractor": "inception-v3-compat",
    "reference": "cifar10-train",
    "weights_path": None,
    "cifar10_root": None,
}


def _noised(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = images.astype(np.float64) + rng.normal(0.0, sigma, images.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _pixel_shuffled(images: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flat = images.reshape(len(images), -1)
    return np.stack([row[rng.permutation(row.size)] for row in flat]).reshape(images.shape)


def _reference_fid(samples: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance computed independently: classifier features + scipy's sqrtm."""
    model = load_classifier(CLASSIFIER)
    with torch.no_grad(), single_threaded():  # only for speed on busy shared cores
        f1 = model.features(uint8_to_model_space(samples)).double().numpy()
        f2 = model.features(uint8_to_model_space(reference)).double().numpy()
        mu1, mu2 = f1.mean(0), f2.mean(0)
        s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def digits_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One compute_fid per sample set, shared by the tests below (they are the slow part)."""
    cache = tmp_path_factory.mktemp("fid_cache")
    images = digits_images()
    sets = {
        "full": images,
        "half": images[::2],
        "noised": _noised(images, sigma=64.0),
        "shuffled": _pixel_shuffled(images),
    }
    results = {
        name: compute_fid(s, preset="digits", fid_config=DIGITS_CFG, cache_dir=cache)
        for name, s in sets.items()
    }
    return {"sets": sets, "results": results, "cache": cache}


def test_digits_fid_orders_quality(digits_results: dict[str, Any]) -> None:
    r = {k: v["fid"] for k, v in digits_results["results"].items()}
    assert abs(r["full"]) < 1e-6  # the reference against itself
    assert 0 < r["half"] < 1.0
    assert r["noised"] > 5.0 and r["noised"] > 20 * r["half"]
    assert r["shuffled"] > 2 * r["noised"]


def test_digits_kid_orders_quality(digits_results: dict[str, Any]) -> None:
    r = {k: v["kid"] for k, v in digits_results["results"].items()}
    # Subsets of a set and its own superset overlap, so KID may dip slightly below zero.
    assert abs(r["full"]) < 0.02 and abs(r["half"]) < 0.02
    assert r["noised"] > 0.1 and r["noised"] > 5 * abs(r["half"])
    assert r["shuffled"] > 2 * r["noised"]
    assert all(v["kid_std"] >= 0 for v in digits_results["results"].values())


def test_digits_result_fields(digits_results: dict[str, Any]) -> None:
    half = digits_results["results"]["half"]
    assert set(half) == {"fid", "kid", "kid_std", "n_samples", "reference", "feature_extractor"}
    assert half["n_samples"] == len(digits_results["sets"]["half"])
    assert (half["reference"], half["feature_extractor"]) == ("digits", "digits-classifier")


@pytest.mark.parametrize("name", ["half", "noised"])
def test_digits_fid_matches_independent_computation(
    digits_results: dict[str, Any], name: str
) -> None:
    ours = digits_results["results"][name]["fid"]
    expected = _reference_fid(digits_results["sets"][name], digits_images())
    assert ours == pytest.approx(expected, rel=1e-3)


def test_reference_cache_is_keyed_by_classifier_weights(
    digits_results: dict[str, Any], tmp_path: Path
) -> None:
    cache = digits_results["cache"]
    names = [p.name for p in cache.iterdir()]
    key = file_digest(CLASSIFIER, "sha256")[:16]
    assert names and all(key in n for n in names)

    # A different classifier must not reuse the cached reference statistics.
    train_classifier(seed=5, epochs=1, out=tmp_path / "other.pt")
    cfg = {**DIGITS_CFG, "classifier": str(tmp_path / "other.pt")}
    half = digits_results["sets"]["half"]
    other = compute_fid(half, preset="digits", fid_config=cfg, cache_dir=cache, kid=False)
    assert len(list(cache.iterdir())) > len(names)
    assert other["fid"] != pytest.approx(digits_results["results"]["half"]["fid"])
    assert math.isnan(other["kid"]) and math.isnan(other["kid_std"])


def test_reference_cache_follows_the_reference_images(
    digits_results: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changed reference images (the data code changed) get their own statistics."""
    from modiff import metrics

    cache, half = tmp_path / "cache", digits_results["sets"]["half"]
    before = compute_fid(half, preset="digits", fid_config=DIGITS_CFG, cache_dir=cache, kid=False)
    flipped = digits_images()[:, :, ::-1].copy()  # e.g. a preprocessing change in modiff.data
    monkeypatch.setattr(metrics, "digits_images", lambda: flipped)
    after = compute_fid(half, preset="digits", fid_config=DIGITS_CFG, cache_dir=cache, kid=False)
    keys = {p.name.split("-digits-classifier")[0] for p in cache.iterdir()}
    assert len(keys) == 2, keys  # one set of reference statistics each
    assert after["fid"] != pytest.approx(before["fid"])


def test_small_sample_sets_use_a_smaller_kid_subset(tmp_path: Path) -> None:
    out = compute_fid(
        digits_images()[:10], preset="digits", fid_config=DIGITS_CFG, cache_dir=tmp_path
    )
    assert out["n_samples"] == 10 and math.isfinite(out["fid"]) and math.isfinite(out["kid"])


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        (digits_images().astype(np.float32), "uint8"),
        (digits_images()[..., 0], "4-D"),
        (digits_images()[:1], "at least 2"),
        (np.zeros((4, 16, 16, 1), np.uint8), r"\(N, 8, 8, 1\)"),
    ],
)
def test_invalid_samples_are_rejected(samples: np.ndarray, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        compute_fid(samples, preset="digits", fid_config=DIGITS_CFG, cache_dir=tmp_path)


def test_unknown_preset_extractor_and_missing_weights(tmp_path: Path) -> None:
    x = digits_images()[:4]
    with pytest.raises(ValueError, match="digits, cifar10"):
        compute_fid(x, preset="mnist", fid_config=DIGITS_CFG, cache_dir=tmp_path)
    bad = {**DIGITS_CFG, "feature_extractor": "inception-v3-compat"}
    with pytest.raises(ValueError, match="digits-classifier"):
        compute_fid(x, preset="digits", fid_config=bad, cache_dir=tmp_path)
    bad = {**CIFAR_CFG, "feature_extractor": "vgg16"}
    with pytest.raises(ValueError, match="inception-v3-compat"):
        compute_fid(
            np.zeros((4, 32, 32, 3), np.uint8), preset="cifar10", fid_config=bad, cache_dir=tmp_path
        )
    missing = {**DIGITS_CFG, "classifier": str(tmp_path / "nope.pt")}
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        compute_fid(x, preset="digits", fid_config=missing, cache_dir=tmp_path)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DNS and an empty $TORCH_HOME (no cached Inception weights, no CIFAR-10)."""
    monkeypatch.setattr(metrics, "host_resolvable", lambda host, timeout=2.0: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case something called set_dir
    return tmp_path


def test_cifar10_offline_without_weights_fails_fast(offline: Path) -> None:
    samples = np.zeros((4, 32, 32, 3), np.uint8)
    start = time.perf_counter()
    with pytest.raises(MetricsOfflineError) as err:
        compute_fid(samples, preset="cifar10", fid_config=CIFAR_CFG, cache_dir=offline / "c")
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert metrics.INCEPTION_WEIGHTS_URL in msg
    assert "feature_extractor_weights_path" in msg and "fid.weights_path" in msg
    assert str(offline / "torch_home" / "hub" / "checkpoints") in msg
    assert "cifar-10-python.tar.gz" in msg and "fid.cifar10_root" in msg
    assert isinstance(err.value, RuntimeError)


def test_cifar10_offline_with_weights_but_no_data(offline: Path) -> None:
    weights = metrics.inception_weights_cache_path()
    weights.parent.mkdir(parents=True)
    weights.touch()  # never loaded: the check fails before any work
    samples = np.zeros((4, 32, 32, 3), np.uint8)
    cfg = {**CIFAR_CFG, "cifar10_root": str(offline / "cifar")}
    with pytest.raises(MetricsOfflineError) as err:
        compute_fid(samples, preset="cifar10", fid_config=cfg, cache_dir=offline / "c")
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and str(offline / "cifar") in msg
    assert metrics.INCEPTION_WEIGHTS_URL not in msg


def test_cifar10_missing_weights_path_is_an_error(tmp_path: Path) -> None:
    cfg = {**CIFAR_CFG, "weights_path": str(tmp_path / "missing.pth")}
    with pytest.raises(FileNotFoundError, match="weights_path"):
        compute_fid(
            np.zeros((4, 32, 32, 3), np.uint8), preset="cifar10", fid_config=cfg, cache_dir=tmp_path
        )


def test_host_resolvable_fails_for_reserved_tld() -> None:
    start = time.perf_counter()
    assert metrics.host_resolvable("modiff-test.invalid", timeout=2.0) is False
    assert time.perf_counter() - start < 3


def test_psnr_known_values() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, size=(3, 8, 8, 1), dtype=np.uint8)  # <= 254: +1 cannot wrap
    b = a.copy()
    b[1] += 1  # MSE 1 -> 20*log10(255)
    b[2] = np.where(np.arange(64).reshape(8, 8, 1) % 2 == 0, 0, 255)
    a[2] = 255 - b[2]  # every pixel off by 255 -> MSE 255^2 -> 0 dB
    out = psnr(a, b)
    assert out.shape == (3,)
    assert out[0] == np.inf
    assert out[1] == pytest.approx(20 * np.log10(255.0), rel=1e-12)  # 48.1308... dB
    assert out[2] == pytest.approx(0.0, abs=1e-12)
    half = a[:1].copy()
    half_b = half.copy()
    half_b.reshape(-1)[:32] = half.reshape(-1)[:32] + 1  # MSE 0.5 -> +3.01 dB
    assert psnr(half, half_b)[0] == pytest.approx(20 * np.log10(255.0) + 10 * np.log10(2.0))


def test_psnr_rejects_bad_inputs() -> None:
    a = np.zeros((2, 4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        psnr(a, a.astype(np.float32))
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1])
