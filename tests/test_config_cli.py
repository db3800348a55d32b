"""Bad input gets a clear error before any work; the CLI lists and documents its stages."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT

from modiff.cli import build_parser, main
from modiff.config import ConfigError, Variant, load_params


@pytest.fixture
def params_file(tmp_path):
    dest = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", dest)
    return dest


def test_default_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.preset == "digits"
    cifar = params.preset_layout("cifar10")
    assert cifar["checkpoint"]["md5"] == "1fa350b952534ae442b1d5235cce5cd3"
    assert cifar["sampling"] == {
        "steps": 100, "skip_type": "quad", "eta": 0.0, "batch_size": 64, "n_samples": 50000,
        "shards": 50,
    }  # fmt: skip
    assert cifar["fid"]["feature_extractor"] == "inception-v3-compat"


@pytest.mark.parametrize(
    "override, message",
    [
        ("preset=imagenet", "preset: Input should be 'digits' or 'cifar10'"),
        ("presets.digits.sampling.n_samples=0", "presets.digits.sampling.n_samples: .* greater"),
        ("presets.digits.sampling.batch_size=-4", "presets.digits.sampling.batch_size: .* greater"),
        ("presets.digits.sampling.skip_type=cosine", "presets.digits.sampling.skip_type"),
        ("presets.digits.model.ch=48", "presets.digits.model.ch: .* multiple of 32"),
        ("threads=two", "threads: Input should be a valid integer"),
        ("device=tpu", "device: Input should be 'auto', 'cpu' or 'cuda'"),
        ("presets.digits.sampling.shards=9", r"shards \(9\) must not exceed the number of batches"),
        ("quant.backend=gpu", "quant.backend: Input should be 'auto', 'native'"),
        ("quant.warmup=twice", "warmup must be 'fp', 'quantized' or 'repeat:k'"),
        ("bench.variants=[w8a8-native]", "'w8a8-native' is not <grid variant name>@<backend>"),
        (
            'variants.x={"method": "qdiff", "a_scale": "static", "w_bits": 8, "a_bits": 8}',
            "variants: 'x' must be named 'qdiff-static-w8a8'",
        ),
        (
            'variants.qdiff-static-w8a4={"method": "qdiff", "a_scale": "static", "w_bits": 8, '
            '"a_bits": 8}',
            "must be named 'qdiff-static-w8a8'",
        ),
        (
            'variants={"qdiff-static-w8a8": {"method": "qdiff", "a_scale": "static", "w_bits": 8, '
            '"a_bits": 8}}',
            "variants must hold fp32",
        ),
        ('variants.fp32={"method": "fp32", "w_bits": 8}', "variants.fp32: .* no other settings"),
        ('variants.fp32={"method": "fp32", "colour": 8}', "variants.fp32.colour: Extra inputs"),
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
    with pytest.raises(ConfigError, match="presets.digits: uniform skip .* no sequence"):
        load_params(params_file, overrides)


def test_missing_key_is_named(params_file):
    params = yaml.safe_load(params_file.read_text())
    del params["presets"]["digits"]["diffusion"]["beta_end"]
    params_file.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="presets.digits.diffusion.beta_end: Field required"):
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
                    "fid", "grid", "bench", "gather", "report", "generate"):  # fmt: skip
        assert command in text
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0


def test_every_declared_file_of_a_stage_is_an_option_of_its_command(capsys):
    from modiff.pipeline import COMMANDS, option_name

    for command, stage in COMMANDS.items():
        with pytest.raises(SystemExit):
            build_parser(command).parse_args([command, "--help"])
        text = capsys.readouterr().out
        for name in {**stage.inputs, **stage.outputs}:
            assert option_name(name) in text, (command, name)


def test_the_cli_choices_are_the_settings_choices(capsys):
    from modiff.choices import Backend, allowed

    with pytest.raises(SystemExit):
        build_parser("sample").parse_args(["sample", "--backend", "gpu"])
    assert "{" + ",".join(allowed(Backend)) + "}" in capsys.readouterr().err


def test_cli_reports_bad_config_before_work(params_file, capsys, tmp_path):
    out = tmp_path / "s.npz"
    bad = "presets.digits.sampling.n_samples=-1"
    files = ["--ckpt", "c.ckpt", "--qparams", "q.pt", "--samples", str(out)]
    code = main(["sample", "--params", str(params_file), "-S", bad, "--variant", "fp32", *files])
    assert code == 2
    assert "n_samples" in capsys.readouterr().err
    assert not out.exists()


def test_sample_without_checkpoint_says_how_to_get_it(params_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fp32 = ["calibrate", "--params", str(params_file), "--variant", "fp32", "--qparams", "q.pt"]
    assert main(fp32) == 0
    files = ["--ckpt", "data/checkpoints/digits.ckpt", "--qparams", "q.pt", "--samples", "s.npz"]
    code = main(["sample", "--params", str(params_file), "--variant", "fp32", *files])
    assert code == 2
    assert "modiff fetch" in capsys.readouterr().err


def test_cifar10_fetch_offline_is_a_clear_error(params_file, tmp_path, capsys, monkeypatch):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.chdir(tmp_path)
    ckpt = "data/checkpoints/cifar10.ckpt"
    code = main(["fetch", "--params", str(params_file), "--preset", "cifar10", "--ckpt", ckpt])
    err = capsys.readouterr().err
    assert code == 2
    assert "cifar10.ckpt" in err and "by hand" in err
    assert not (tmp_path / "data/checkpoints/cifar10.ckpt").exists()


@pytest.mark.parametrize(
    "n, batch, shards", [(1000, 250, 2), (1000, 250, 3), (45, 10, 4), (7, 7, 1)]
)
def test_shards_are_whole_batches_tiling_the_images(n, batch, shards):
    from modiff.config import Sampling

    sampling = Sampling(steps=10, skip_type="quad", eta=0.0, n_samples=n, batch_size=batch,
                        shards=shards)  # fmt: skip
    ranges = [sampling.shard_range(i) for i in range(shards)]
    assert [i for r in ranges for i in r] == list(range(n))
    assert all(r.start % batch == 0 and len(r) > 0 for r in ranges)
    with pytest.raises(ConfigError, match="out of range"):
        sampling.shard_range(shards)


def test_the_fid_choices_name_the_extractor_the_classifier_registers():
    from modiff.classifier import FEATURE_EXTRACTOR_NAME
    from modiff.config import FID_FEATURE_EXTRACTORS

    assert FID_FEATURE_EXTRACTORS["digits"] == (FEATURE_EXTRACTOR_NAME,)


def test_variant_names_parse_to_the_variants_they_name():
    params = load_params(ROOT / "params.yaml", [])
    full_table = yaml.safe_load((ROOT / "workflow/full_table.yaml").read_text())["variants"]
    for name in [*params.variants, *full_table]:
        assert Variant.from_name(name).name == name
    assert Variant.from_name("modiff-lcq-w4a8-brecq").a_granularity == "per_sample"
    with pytest.raises(ConfigError, match="is not a variant name"):
        Variant.from_name("w8a8-native")


def test_the_committed_schema_is_generated_from_the_settings_and_accepts_params():
    import json

    import jsonschema

    from modiff.config import json_schema

    schema = json.loads((ROOT / "params.schema.json").read_text())
    assert schema == json_schema(), "params.schema.json is stale: run `modiff generate`"
    jsonschema.validate(yaml.safe_load((ROOT / "params.yaml").read_text()), schema)
    bad = yaml.safe_load((ROOT / "params.yaml").read_text())
    bad["variants"]["w8a8"] = {"method": "qdiff"}
    with pytest.raises(jsonschema.ValidationError, match="w8a8"):
        jsonschema.validate(bad, schema)


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
    args = {"fid": [*settings, "--samples", str(broken), "--reference", str(good),
                    "--metrics", f"{out}.json"],
            "grid": ["--samples", str(broken), "--grid", f"{out}.png"],
            "damage": [*settings, "--samples", str(broken), "--sigma", "0.1", "--damaged", out],
            "merge": ["--shards", str(broken), "--samples", f"{out}.npz"]}[command]  # fmt: skip
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
    short += ["-S", "presets.digits.sampling.n_samples=2", "-S", "presets.digits.sampling.shards=1"]
    assert main(["calibrate", "--params", str(params_file), "--variant", "fp32",
                 "--qparams", "q.pt"]) == 0  # fmt: skip
    sample = ["sample", "--params", str(params_file), "--variant", "fp32", "--qparams", "q.pt",
              "--ckpt", str(ckpt), "--samples", "s.npz", *short]  # fmt: skip
    assert main(sample) == 0  # the file as fetched loads
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, in the middle of a tensor: still a loadable checkpoint
    ckpt.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(sample) == 2
    err = capsys.readouterr().err
    assert str(Path("data/checkpoints/digits.ckpt")) in err and "modiff fetch" in err, err
    with pytest.raises(ChecksumError, match="changed since it was fetched"):
        bench.run(load_params(params_file), ckpt)


def test_variant_and_qparams_must_agree(params_file, tmp_path, capsys):
    # FP32's parameters file: written without calibration data or a model.
    fp32 = tmp_path / "fp32.pt"
    calibrate = ["calibrate", "--params", str(params_file), "--variant", "fp32"]
    assert main([*calibrate, "--calib", "unused.pt", "--qparams", str(fp32)]) == 0
    sample = ["sample", "--params", str(params_file), "--samples", str(tmp_path / "s.npz"),
              "--ckpt", "c.ckpt"]  # fmt: skip
    assert main([*sample, "--variant", "qdiff-static-w8a8", "--qparams", str(fp32)]) == 2
    err = capsys.readouterr().err
    assert "holds variant fp32, not --variant qdiff-static-w8a8" in err, err


def test_psnr_against_other_images_is_refused_before_any_features(params_file, tmp_path, capsys,
                                                                  monkeypatch):  # fmt: skip
    from modiff import metrics
    from modiff.io import save_images

    monkeypatch.setattr(metrics, "compute_fid", lambda *a, **k: pytest.fail("computed FID"))
    images = np.zeros((4, 8, 8, 1), np.uint8)
    meta = {"variant": "fp32", "preset": "digits", "method": "fp32", "quant": None, "seed": 0,
            "sampling": {"steps": 4}, "device": "cpu", "threads": 2}  # fmt: skip
    save_images(tmp_path / "q.npz", images, **meta, indices=[0, 4])
    save_images(tmp_path / "ref.npz", images, **meta, indices=[4, 8])
    args = [
        "fid",
        "--params",
        str(params_file),
        "--samples",
        str(tmp_path / "q.npz"),
        "--reference",
        str(tmp_path / "ref.npz"),
        "--metrics",
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
            str(tmp_path / "q.pt"), "--ckpt", "c.ckpt",
            "--samples", str(tmp_path / "s.npz")]  # fmt: skip
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
                "--variant", name, "--calib", "missing.pt", "--ckpt", str(fetched_checkpoint),
                "--qparams", f"{name}.pt"]  # fmt: skip
        assert main(args) == code, name
    assert "missing.pt not found; run `modiff calib-data`" in capsys.readouterr().err
    assert not Path("qdiff-lcq-w4a4-brecq.pt").exists()
