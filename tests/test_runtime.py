"""Where models run: device and quantized backend, resolved in one place."""

import logging

import pytest
import torch
from conftest import ROOT

from modiff.cli import main
from modiff.io import load_images
from modiff.runtime import Execution, resolve_execution


@pytest.fixture
def cuda_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("device", ["cpu", "auto"])
@pytest.mark.parametrize("backend", ["native", "simulated", None])
def test_the_cpu_runs_every_backend(monkeypatch, device, backend):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_execution(device, backend) == Execution(torch.device("cpu"), backend)


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_on_cuda_native_runs_simulated_and_says_so(cuda_present, device, caplog):
    with caplog.at_level(logging.INFO, logger="modiff.runtime"):
        execution = resolve_execution(device, "native")
    assert execution == Execution(torch.device("cuda"), "simulated")
    assert "int8 kernels run on the CPU only" in caplog.text
    assert "running simulated backend on cuda" in caplog.text


def test_on_cuda_other_models_keep_their_backend(cuda_present):
    assert resolve_execution("cuda", "simulated").backend == "simulated"
    assert resolve_execution("auto", None) == Execution(torch.device("cuda"), None)


def test_cuda_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device is available; use cpu/auto"):
        resolve_execution("cuda", "native")


def test_sample_records_the_backend_that_ran(tmp_path, monkeypatch):
    """`modiff sample` takes device and backend from resolve_execution: where that says
    'simulated' (a GPU host), the samples' records say so, not the qparams file's 'native'."""
    ckpt = str(ROOT / "data/pretrained/digits_ddim.pt")
    params = [
        "--params",
        str(ROOT / "params.yaml"),
        "-S",
        "presets.digits.sampling.steps=3",
        "-S",
        "presets.digits.calibration.cali_st=2",
        "-S",
        "quant.backend=native",
        "-S",
        "presets.digits.sampling.n_samples=2",
        "-S",
        "presets.digits.sampling.shards=1",
    ]
    qparams = tmp_path / "q.pt"
    calibrate = ["calibrate", *params, "--variant", "qdiff-dynamic-w8a8", "--ckpt", ckpt,
                 "--qparams", str(qparams)]  # fmt: skip
    assert main(calibrate) == 0
    chosen = []

    def on_a_gpu_host(device, backend=None):
        chosen.append((device, backend))
        return Execution(torch.device("cpu"), "simulated" if backend == "native" else backend)

    from modiff.stages import sample

    monkeypatch.setattr(sample, "resolve_execution", on_a_gpu_host)
    out = tmp_path / "s.npz"
    sample = ["sample", *params, "--ckpt", ckpt, "--qparams", str(qparams)]
    assert main([*sample, "--variant", "qdiff-dynamic-w8a8", "--samples", str(out)]) == 0
    _, meta = load_images(out)
    assert chosen == [("auto", "native")]
    assert meta["quant"]["backend"] == "simulated"
    assert "schemes" not in meta["kernels"] and meta["kernels"]["cpu_isa"]
