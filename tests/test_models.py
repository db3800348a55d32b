import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_config

from modiff.models import build_model
from modiff.models.unet import AttnBlock, Downsample, timestep_embedding

# The official checkpoint's keys and shapes in order (from ermongroup/ddim's Model and
# configs/cifar10.yml), kept in the repository so that this test runs on every clone.
CIFAR10_KEYS = ROOT / "tests" / "data" / "ddim_cifar10_keys.json"


def _cifar10_config() -> dict:
    ref = json.loads(CIFAR10_KEYS.read_text())
    return {
        "data": {"image_size": ref["config_data_image_size"], "channels": 3},
        "model": ref["config_model"],
        "diffusion": {"num_diffusion_timesteps": 1000},
    }


def test_cifar10_state_dict_matches_official_checkpoint_layout():
    ref = json.loads(CIFAR10_KEYS.read_text())
    expected = [(k, list(shape)) for k, shape in ref["keys"]]
    model = build_model(_cifar10_config())
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected  # names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == ref["total_parameters"] == 35_746_307
    assert len(list(model.buffers())) == 0


def test_cifar10_layer_census_matches_paper():
    # The paper modulates 113 layers on this UNet: 89 convs and 24 linears.
    model = build_model(_cifar10_config())
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert (convs, linears) == (89, 24)


def test_timestep_embedding_is_sines_then_cosines():
    t = torch.tensor([0, 1, 500])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-i * math.log(10000) / 3) for i in range(4)]
    expected = [[math.sin(tt * f) for f in freqs] + [math.cos(tt * f) for f in freqs] for tt in t]
    torch.testing.assert_close(emb, torch.tensor(expected), atol=2e-6, rtol=0)
    assert torch.equal(timestep_embedding(t.float(), 8), emb)


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(1, with_conv=True)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left input of each window
        down.conv.bias.zero_()
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    # With no top/left padding the top-left tap lands on x[2i, 2j].
    assert torch.equal(down(x), x[:, :, ::2, ::2])


def test_attention_is_single_head_scaled_dot_product():
    torch.manual_seed(0)
    attn = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 4)
    h = attn.norm(x)
    q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (attn.q, attn.k, attn.v))
    ref = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), softmax over keys
    ref = attn.proj_out(ref.transpose(1, 2).reshape(2, 32, 4, 4))
    torch.testing.assert_close(attn(x), x + ref, atol=1e-5, rtol=1e-5)


def test_group_norm_settings():
    model = build_model(tiny_config())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(n.num_groups == 32 and n.eps == 1e-6 and n.affine for n in norms)


def test_forward_shape_and_time_dtype_invariance():
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 10, 999])
    with torch.no_grad():
        out_long, out_float = model(x, t), model(x, t.float())
    assert out_long.shape == x.shape
    assert torch.equal(out_long, out_float)


def test_wrong_resolution_and_bad_config_are_clear_errors():
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match="expects 8x8"):
        model(torch.randn(1, 3, 16, 16), torch.zeros(1))
    cfg = tiny_config()
    del cfg["model"]["ch_mult"]
    with pytest.raises(KeyError, match="model.ch_mult"):
        build_model(cfg)
