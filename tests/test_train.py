import copy

import pytest
import yaml
from conftest import ROOT

from modiff.fetch import file_digest
from modiff.train import train_diffusion


@pytest.fixture
def digits_config():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = copy.deepcopy(params["presets"]["digits"])
    cfg["training"]["iterations"] = 3
    cfg["training"]["batch_size"] = 16
    return cfg


def test_training_is_seeded_and_byte_reproducible(digits_config, tmp_path):
    _, first = train_diffusion(digits_config, tmp_path / "a.pt", progress=False)
    _, second = train_diffusion(digits_config, tmp_path / "b.pt", progress=False)
    assert first["final_loss_ema"] == second["final_loss_ema"]
    assert file_digest(tmp_path / "a.pt", "sha256") == file_digest(tmp_path / "b.pt", "sha256")
    digits_config["training"]["seed"] = 1
    train_diffusion(digits_config, tmp_path / "c.pt", progress=False)
    assert file_digest(tmp_path / "c.pt", "sha256") != file_digest(tmp_path / "a.pt", "sha256")


def test_training_refuses_presets_with_published_checkpoints(digits_config):
    digits_config["data"]["dataset"] = "CIFAR10"
    with pytest.raises(ValueError, match="published checkpoint"):
        train_diffusion(digits_config, None, progress=False)
