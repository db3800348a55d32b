import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn

from modiff.diffusion import (
    alpha_bar,
    beta_schedule,
    data_transform,
    ddim_sample,
    inverse_data_transform,
    sample_images,
    to_uint8,
)
from modiff.models import build_model
from modiff.timesteps import timestep_sequence


def test_quad_sequences_keep_duplicates():
    q100 = timestep_sequence(100, "quad")
    assert q100[:9] == [0, 0, 0, 0, 1, 2, 2, 3, 5]
    assert len(q100) == 100 and len(set(q100)) == 96 and q100[-1] == 800
    q20 = timestep_sequence(20, "quad")
    assert q20[:5] == [0, 2, 8, 19, 35] and q20[-3:] == [640, 718, 800] and len(q20) == 20


def test_uniform_sequences():
    assert timestep_sequence(10, "uniform") == list(range(0, 1000, 100))
    assert len(timestep_sequence(30, "uniform")) == 31  # 1000 // 30 = 33 does not divide 1000
    with pytest.raises(ValueError, match="no sequence"):
        timestep_sequence(2000, "uniform")
    with pytest.raises(ValueError, match="positive"):
        timestep_sequence(0, "quad")
    with pytest.raises(ValueError, match="unknown"):
        timestep_sequence(10, "cosine")


def test_linear_betas_and_alpha_bar():
    betas = beta_schedule(tiny_config())
    assert betas.dtype == torch.float32 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    a = alpha_bar(betas, torch.tensor([-1, 0, 999]))
    assert a[0].item() == 1.0
    assert a[1].item() == pytest.approx(1 - 1e-4)
    expected = np.prod(1 - betas.double().numpy())
    assert a[2].item() == pytest.approx(expected, rel=1e-4)


class _ZeroEps(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


class _PointMassOracle(nn.Module):
    """The exact eps-predictor when all data equals x0: eps = (x - sqrt(a) x0) / sqrt(1 - a)."""

    def __init__(self, x0, betas):
        super().__init__()
        self.x0, self.betas = x0, betas

    def forward(self, x, t):
        a = alpha_bar(self.betas, t.long())
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


def test_ddim_with_zero_eps_rescales_by_first_alpha():
    betas = beta_schedule(tiny_config())
    seq = timestep_sequence(10, "uniform")
    x_T = torch.randn(2, 1, 4, 4)
    out = ddim_sample(_ZeroEps(), x_T, seq, betas)
    a_first = alpha_bar(betas, torch.tensor([seq[-1]]))
    torch.testing.assert_close(out, x_T / a_first.sqrt(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skip", ["uniform", "quad"])
def test_ddim_recovers_point_mass_data(skip):
    betas = beta_schedule(tiny_config())
    x0 = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    x_T = torch.randn(3, 1, 4, 4)
    out = ddim_sample(_PointMassOracle(x0, betas), x_T, timestep_sequence(20, skip), betas)
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-4, rtol=0)


def test_data_transforms_round_trip():
    img = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(inverse_data_transform(data_transform(img)), img)
    u8 = to_uint8(torch.tensor([-1.0, -0.2, 1.0, 3.0]).reshape(1, 1, 1, 4))
    assert u8.dtype == np.uint8 and u8.shape == (1, 1, 4, 1)
    assert u8.ravel().tolist() == [0, 102, 255, 255]


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_images_do_not_depend_on_batching(eta):
    torch.manual_seed(0)
    cfg = tiny_config(in_channels=1, out_ch=1)
    model = build_model(cfg).eval()
    kw = dict(steps=5, skip_type="uniform", eta=eta, seed=7, progress=False)
    whole = sample_images(model, cfg, indices=range(8), batch_size=8, **kw)
    ragged = sample_images(model, cfg, indices=range(8), batch_size=3, **kw)
    shard = sample_images(model, cfg, indices=range(4, 8), batch_size=4, **kw)
    np.testing.assert_array_equal(whole, ragged)
    np.testing.assert_array_equal(whole[4:], shard)
    other_seed = sample_images(model, cfg, indices=range(8), batch_size=8, **{**kw, "seed": 8})
    assert not np.array_equal(whole, other_seed)
