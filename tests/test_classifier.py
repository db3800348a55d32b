"""The digits classifier: committed artefact, training reproducibility, torch-fidelity extractor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from modiff.classifier import (
    FEATURE_EXTRACTOR_NAME,
    DigitsClassifier,
    DigitsFeatureExtractor,
    class_histogram,
    classifier_accuracy,
    digits_split,
    load_classifier,
    predict_labels,
    register_digits_feature_extractor,
    train_classifier,
)
from modiff.data import digits_images, digits_labels, uint8_to_model_space

CLASSIFIER = Path(__file__).resolve().parents[1] / "data" / "pretrained" / "digits_classifier.pt"


@pytest.fixture(scope="module")
def model() -> DigitsClassifier:
    return load_classifier(CLASSIFIER)


def test_committed_classifier_is_small_and_accurate(model: DigitsClassifier) -> None:
    assert CLASSIFIER.stat().st_size < 1_000_000
    # Only the split's seed comes from the sidecar; the accuracy is recomputed here.
    seed = json.loads(CLASSIFIER.with_name(CLASSIFIER.name + ".json").read_text())["seed"]
    assert classifier_accuracy(model, seed=seed) >= 0.97


def test_split_is_stratified_disjoint_and_deterministic() -> None:
    train, test = digits_split(0)
    assert len(train) + len(test) == len(digits_labels())
    assert not set(train) & set(test)
    assert len(test) == pytest.approx(0.2 * len(digits_labels()), abs=1)
    assert np.array_equal(test, digits_split(0)[1])
    assert not np.array_equal(test, digits_split(1)[1])
    counts = np.bincount(digits_labels()[test], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # ~20% of each class (174..183 per class)


def test_training_is_reproducible_and_saved_atomically(tmp_path: Path) -> None:
    m1, metrics = train_classifier(seed=3, epochs=1, out=tmp_path / "a" / "clf.pt")
    _, _ = train_classifier(seed=3, epochs=1, out=tmp_path / "b" / "clf.pt")
    a, b = (tmp_path / d / "clf.pt" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()  # same seed -> byte-identical weights file
    assert sorted(p.name for p in a.parent.iterdir()) == ["clf.pt", "clf.pt.json"]  # no temp files
    sidecar = json.loads((tmp_path / "a" / "clf.pt.json").read_text())
    assert sidecar == metrics
    assert set(metrics) == {"test_accuracy", "n_train", "n_test", "seed", "epochs", "train_seconds"}
    assert (metrics["n_train"], metrics["n_test"], metrics["seed"]) == (1437, 360, 3)
    loaded = load_classifier(a)
    assert not loaded.training
    for key, value in m1.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_load_is_strict(tmp_path: Path) -> None:
    state = DigitsClassifier().state_dict()
    state.pop("fc2.bias")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="fc2.bias"):
        load_classifier(tmp_path / "bad.pt")


def test_predict_labels_and_histogram(model: DigitsClassifier) -> None:
    images, labels = digits_images(), digits_labels()
    pred = predict_labels(model, images)
    assert pred.shape == labels.shape and pred.dtype == np.int64
    assert (pred == labels).mean() >= 0.97
    hist = class_histogram(model, images)
    assert len(hist) == 10 and sum(hist) == len(images)
    assert all(isinstance(c, int) for c in hist)
    assert np.abs(np.array(hist) - np.bincount(labels)).max() <= 10
    assert class_histogram(model, images[labels == 3])[3] >= 0.95 * (labels == 3).sum()


def test_registration_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    importlib.import_module("modiff.classifier")
    register_digits_feature_extractor()
    register_digits_feature_extractor()
    assert FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_NAME] is DigitsFeatureExtractor

    # A reloaded module defines a look-alike class: re-registering points at the live one.
    attrs = {"__module__": DigitsFeatureExtractor.__module__}
    stale = type("DigitsFeatureExtractor", (FeatureExtractorBase,), attrs)
    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, FEATURE_EXTRACTOR_NAME, stale)
    register_digits_feature_extractor()
    assert FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_NAME] is DigitsFeatureExtractor

    # Someone else's extractor under our name is a real conflict.
    other = type("Other", (FeatureExtractorBase,), {})
    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, FEATURE_EXTRACTOR_NAME, other)
    with pytest.raises(ValueError, match="already registered"):
        register_digits_feature_extractor()


def test_feature_extractor_matches_classifier(model: DigitsClassifier) -> None:
    # Built exactly the way torch-fidelity builds extractors inside calculate_metrics.
    fe = create_feature_extractor(
        FEATURE_EXTRACTOR_NAME,
        ["features", "logits"],
        cuda=False,
        feature_extractor_weights_path=str(CLASSIFIER),
        verbose=False,
    )
    assert fe.get_default_feature_layer_for_metric("fid") == "features"
    assert fe.get_default_feature_layer_for_metric("kid") == "features"
    images = digits_images()[:50]
    gray = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    feats, logits = fe(gray)
    feats_rgb, _ = fe(gray.repeat(1, 3, 1, 1))
    with torch.no_grad():
        expected = model.features(uint8_to_model_space(images))
    assert feats.shape == (50, 128) and feats.dtype == torch.float32
    assert torch.equal(feats, expected)
    assert torch.equal(feats_rgb, feats)
    assert torch.equal(logits.argmax(1), torch.from_numpy(predict_labels(model, images)))
    with pytest.raises(ValueError, match="uint8"):
        fe(gray.float())
    with pytest.raises(ValueError, match="feature_extractor_weights_path"):
        DigitsFeatureExtractor(FEATURE_EXTRACTOR_NAME, ["features"])


@pytest.mark.slow
def test_full_training_run_meets_target(tmp_path: Path) -> None:
    _, metrics = train_classifier(seed=0, out=tmp_path / "clf.pt")
    assert metrics["test_accuracy"] >= 0.97
    assert metrics["train_seconds"] < 120
    assert classifier_accuracy(load_classifier(tmp_path / "clf.pt"), seed=0) >= 0.97
