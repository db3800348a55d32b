"""Bad input gets a clear error before any work; the CLI lists and documents its stages."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT

from modiff.cli import build_parser, main
from modiff.config import ConfigError, load_params, preset_config


@pytest.fixture
def params_file(tmp_path):
    dest = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", dest)
    return dest


def test_default_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params["preset"] == "digits"
    cifar = preset_config(params, "cifar10")
    assert cifar["checkpoint"]["md5"] == "1fa350b952534ae442b1d5235cce5cd3"
    assert cifar["sampling"] == {
        "steps": 100, "skip_type": "quad", "eta": 0.0, "batch_size": 64, "n_samples": 50000,
        "shards": 50,
    }  # fmt: skip
    assert cifar["fid"]["feature_extractor"] == "inception-v3-compat"


@pytest.mark.parametrize(
    "override, message",
    [
        ("preset=imagenet", "unknown preset 'imagenet'; allowed: cifar10, digits"),
        ("presets.digits.sampling.n_samples=0", "presets.digits.sampling.n_samples: 0 is less"),
        ("presets.digits.sampling.batch_size=-4", "presets.digits.sampling.batch_size: -4"),
        ("presets.digits.sampling.skip_type=cosine", "presets.digits.sampling.skip_type"),
        ("presets.digits.model.ch=48", "presets.digits.model.ch"),
        ("threads=two", "threads: 'two' is not of type 'integer'"),
        ("device=tpu", "device: 'tpu' is not one of"),
        ("presets.digits.sampling.shards=9", r"shards \(9\) must not exceed the number of batches"),
        ("quant.backend=gpu", "quant.backend: 'gpu' is not one of"),
        (
            'variants.x={"method": "qdiff", "a_scale": "static", "w_bits": 8, "a_bits": 8}',
            "variants: 'x' does not match",
        ),
        (
            'variants.qdiff-static-w8a4={"method": "qdiff", "a_scale": "static", "w_bits": 8, '
            '"a_bits": 8}',
            "must be named 'qdiff-static-w8a8'",
        ),
        (
            'variants={"qdiff-static-w8a8": {"method": "qdiff", "a_scale": "static", "w_bits": 8, '
            '"a_bits": 8}}',
            "variants: 'fp32' is a required property",
        ),
        ('variants.fp32={"method": "fp32", "w_bits": 8}', "variants.fp32: .* is not valid"),
        (
            'variants.qdiff-static-w4a8={"method": "qdiff", "a_scale": "static", "w_bits": 4, '
            '"a_bits": 8, "reconstruction": "block"}',
            "must be named 'qdiff-static-w4a8-brecq'",
        ),
        (
            'variants.qdiff-dynamic-w4a4={"method": "qdiff", "a_scale": "dynamic", "w_bits": 4, '
            '"a_bits": 4, "a_granularity": "per_sample"}',
            "must be named 'qdiff-lcq-w4a4'",
        ),
        (
            'variants.qdiff-lcq-w4a4={"method": "qdiff", "a_scale": "static", "w_bits": 4, '
            '"a_bits": 4, "a_granularity": "per_sample"}',
            "variants.qdiff-lcq-w4a4: a_granularity per_sample needs a_scale dynamic",
        ),
    ],
)
def test_bad_settings_name_the_key(params_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_params(params_file, [override])


def test_step_count_that_yields_no_sequence(params_file):
    overrides = ["presets.digits.sampling.skip_type=uniform", "presets.digits.sampling.steps=5000"]
    with pytest.raises(ConfigError, match="presets.digits.sampling: uniform skip .* no sequence"):
        load_params(params_file, overrides)


def test_missing_key_is_named(params_file):
    params = yaml.safe_load(params_file.read_text())
    del params["presets"]["digits"]["diffusion"]["beta_end"]
    params_file.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="presets.digits.diffusion: 'beta_end' is a required"):
        load_params(params_file)


def test_override_syntax_errors(params_file):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_params(params_file, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="'nothere' is not a section"):
        load_params(params_file, ["nothere.x=1"])


def test_cli_lists_every_stage_with_help(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("fetch", "train", "calib-data", "calibrate", "sample", "merge", "damage",
                    "fid", "grid", "bench", "gather", "report"):  # fmt: skip
        assert command in text
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0


def test_cli_reports_bad_config_before_work(params_file, capsys, tmp_path):
    out = tmp_path / "s.npz"
    bad = "presets.digits.sampling.n_samples=-1"
    code = main(["sample", "--params", str(params_file), "-S", bad, "--out", str(out)])
    assert code == 2
    assert "n_samples" in capsys.readouterr().err
    assert not out.exists()


def test_cli_rejects_negative_counts(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--out", "x.npz", "--n", "0"])
    assert "positive" in capsys.readouterr().err


def test_sample_without_checkpoint_says_how_to_get_it(params_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["sample", "--params", str(params_file), "--out", "s.npz"])
    assert code == 2
    assert "modiff fetch" in capsys.readouterr().err


def test_cifar10_fetch_offline_is_a_clear_error(params_file, tmp_path, capsys, monkeypatch):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.chdir(tmp_path)
    code = main(["fetch", "--params", str(params_file), "--preset", "cifar10"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cifar10.ckpt" in err and "by hand" in err
    assert not (tmp_path / "data/checkpoints/cifar10.ckpt").exists()


@pytest.mark.parametrize(
    "n, batch, shards", [(1000, 250, 2), (1000, 250, 3), (45, 10, 4), (7, 7, 1)]
)
def test_shards_are_whole_batches_tiling_the_images(n, batch, shards):
    from modiff.config import shard_range

    sampling = {"n_samples": n, "batch_size": batch, "shards": shards}
    ranges = [shard_range(sampling, i) for i in range(shards)]
    assert [i for r in ranges for i in r] == list(range(n))
    assert all(r.start % batch == 0 and len(r) > 0 for r in ranges)
    with pytest.raises(ConfigError, match="out of range"):
        shard_range(sampling, shards)


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "no metadata"])
@pytest.mark.parametrize("command", ["fid", "grid", "damage", "merge"])
def test_a_broken_samples_file_is_one_clear_line(params_file, tmp_path, capsys, command, damage):
    from modiff.io import save_images

    good = tmp_path / "good.npz"
    save_images(good, np.zeros((4, 8, 8, 1), np.uint8), indices=[0, 1, 2, 3])
    broken = tmp_path / "broken.npz"
    if damage == "truncated":
        broken.write_bytes(good.read_bytes()[:-100])
    elif damage == "not a zip":
        broken.write_text("images")
    else:
        np.savez(broken, images=np.zeros((4, 8, 8, 1), np.uint8))
    out, settings = str(tmp_path / "out"), ["--params", str(params_file)]
    args = {"fid": [*settings, "--samples", str(broken), "--out", f"{out}.json"],
            "grid": ["--samples", str(broken), "--out", f"{out}.png"],
            "damage": [*settings, "--samples", str(broken), "--sigma", "0.1", "--out", out],
            "merge": ["--shards", str(broken), "--out", f"{out}.npz"]}[command]  # fmt: skip
    assert main([command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(broken) in err and "is not a complete modiff samples file" in err
    assert "modiff merge" in err and not list(tmp_path.glob("out*"))


@pytest.fixture
def fetched_checkpoint(tmp_path, monkeypatch) -> Path:
    """The digits checkpoint where `modiff fetch` leaves it, in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "data/checkpoints/digits.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(ROOT / "data/pretrained/digits_ddim.pt", ckpt)
    return ckpt


def test_a_checkpoint_changed_after_fetching_is_refused_at_load(params_file, capsys,
                                                                 fetched_checkpoint):  # fmt: skip
    """The fetched file is trusted only while its digest matches params.yaml's: sampling, and
    the benchmark, verify it at every load."""
    from modiff import bench
    from modiff.fetch import ChecksumError

    ckpt = fetched_checkpoint
    short = ["-S", "presets.digits.sampling.steps=4", "-S", "presets.digits.calibration.cali_st=2"]
    sample = ["sample", "--params", str(params_file), "--out", "s.npz", "--n", "2", *short]
    assert main(sample) == 0  # the file as fetched loads
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, in the middle of a tensor: still a loadable checkpoint
    ckpt.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(sample) == 2
    err = capsys.readouterr().err
    assert str(Path("data/checkpoints/digits.ckpt")) in err and "modiff fetch" in err, err
    with pytest.raises(ChecksumError, match="changed since it was fetched"):
        bench.run(load_params(params_file))


def test_variant_and_qparams_must_agree(params_file, tmp_path, capsys):
    sample = ["sample", "--params", str(params_file), "--out", str(tmp_path / "s.npz")]
    assert main([*sample, "--variant", "qdiff-static-w8a8"]) == 2
    assert "a quantized --variant needs --qparams" in capsys.readouterr().err
    # FP32's parameters file: written without calibration data or a model.
    fp32 = tmp_path / "fp32.pt"
    calibrate = ["calibrate", "--params", str(params_file), "--variant", "fp32"]
    assert main([*calibrate, "--calib", "unused.pt", "--out", str(fp32)]) == 0
    assert main([*sample, "--variant", "qdiff-static-w8a8", "--qparams", str(fp32)]) == 2
    err = capsys.readouterr().err
    assert "holds variant fp32, not --variant qdiff-static-w8a8" in err, err


def test_psnr_against_other_images_is_refused_before_any_features(params_file, tmp_path, capsys,
                                                                  monkeypatch):  # fmt: skip
    from modiff import metrics
    from modiff.io import save_images

    monkeypatch.setattr(metrics, "compute_fid", lambda *a, **k: pytest.fail("computed FID"))
    images = np.zeros((4, 8, 8, 1), np.uint8)
    save_images(tmp_path / "q.npz", images, indices=[0, 4], seed=0)
    save_images(tmp_path / "ref.npz", images, indices=[4, 8], seed=0)
    args = [
        "fid",
        "--params",
        str(params_file),
        "--samples",
        str(tmp_path / "q.npz"),
        "--reference-samples",
        str(tmp_path / "ref.npz"),
        "--out",
        str(tmp_path / "m.json"),
    ]
    assert main(args) == 2  # fmt: skip
    assert "holds other images (indices/seed)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("blob", "message"),
    [({"format": "modiff-calibration-v1"}, "is not a modiff quantization parameters file"),
     ("qparams-with-unknown-field", "unknown QuantConfig fields \\['colour'\\]")],
)  # fmt: skip
def test_a_bad_qparams_file_is_named(params_file, tmp_path, capsys, blob, message):
    import torch

    from modiff.quant import QuantConfig
    from modiff.quant.api import PARAMS_FORMAT

    if blob == "qparams-with-unknown-field":
        blob = {"format": PARAMS_FORMAT, "config": {**QuantConfig().to_dict(), "colour": "red"},
                "layers": {}, "fingerprint": ""}  # fmt: skip
    torch.save(blob, tmp_path / "q.pt")
    args = ["sample", "--params", str(params_file), "--variant", "x", "--qparams",
            str(tmp_path / "q.pt"), "--out", str(tmp_path / "s.npz")]  # fmt: skip
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_config_that_selects_no_layer_is_an_error():
    from torch import nn

    from modiff.quant import QuantConfig, quantize_

    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="selects no Conv2d/Linear layer"):
        quantize_(model, QuantConfig(a_scale="dynamic", include=("nothing.*",)))


def test_a_dynamic_variant_that_learns_reads_the_calibration_data(params_file, capsys,
                                                                  fetched_checkpoint):  # fmt: skip
    # LCQ scales need no calibration data, but LCQ with reconstruction learns from it.
    lcq = "{method: qdiff, a_scale: dynamic, a_granularity: per_sample, w_bits: 4, a_bits: 4}"
    for name, entry, code in [
        ("qdiff-lcq-w4a4", lcq, 0),
        ("qdiff-lcq-w4a4-brecq", lcq[:-1] + ", reconstruction: block}", 2),
    ]:
        args = ["calibrate", "--params", str(params_file), "-S", f"variants.{name}={entry}",
                "--variant", name, "--calib", "missing.pt", "--out", f"{name}.pt"]  # fmt: skip
        assert main(args) == code, name
    assert "missing.pt not found; run `modiff calib-data`" in capsys.readouterr().err
    assert not Path("qdiff-lcq-w4a4-brecq.pt").exists()
