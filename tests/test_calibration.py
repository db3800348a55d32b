import pytest
import torch
from conftest import ROOT

from modiff.calibration import (
    CalibrationMismatch,
    collect_calibration,
    kept_steps,
    load_calibration,
    save_calibration,
)
from modiff.checkpoint import load_into
from modiff.config import load_params
from modiff.models import build_model


def test_kept_steps_each_have_a_previous_step():
    steps = kept_steps(100, 20)
    assert steps == list(range(4, 100, 5)) and len(steps) == 20
    assert kept_steps(10, 5) == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError, match="cali_st"):
        kept_steps(10, 10)


@pytest.fixture(scope="module")
def digits():
    preset = load_params(ROOT / "params.yaml").preset_layout("digits")
    preset["sampling"]["steps"] = 10
    model = load_into(build_model(preset), ROOT / "data/pretrained/digits_ddim.pt").eval()
    return preset, model


def test_calibration_data_is_deterministic_and_paired(digits):
    preset, model = digits
    kw = dict(cali_st=5, cali_n=6, seed=3, batch_size=4)
    a = collect_calibration(model, preset, **kw)
    b = collect_calibration(model, preset, **kw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["xs"].shape == (30, 1, 8, 8) and a["ts"].shape == (30,)
    # Each kept input's previous step is the sampler's step before it (larger t).
    assert (a["ts_prev"] > a["ts"]).all()
    assert len(set(a["ts"].tolist())) == 5  # cali_st distinct kept time steps
    c = collect_calibration(model, preset, **{**kw, "seed": 4})
    assert not torch.equal(a["xs"], c["xs"])


def test_calibration_file_for_other_settings_is_refused(digits, tmp_path):
    preset, model = digits
    data = collect_calibration(model, preset, cali_st=2, cali_n=2, seed=0, batch_size=2)
    meta = {"preset": "digits", "checkpoint_sha256": "ab" * 32, "seed": 0}
    save_calibration(data, meta, tmp_path / "cal.pt")
    loaded = load_calibration(tmp_path / "cal.pt", meta)
    assert torch.equal(loaded["xs_prev"], data["xs_prev"])
    with pytest.raises(CalibrationMismatch, match="checkpoint_sha256: file has"):
        load_calibration(tmp_path / "cal.pt", {**meta, "checkpoint_sha256": "cd" * 32})
    with pytest.raises(FileNotFoundError, match="modiff calib-data"):
        load_calibration(tmp_path / "missing.pt", meta)


def test_quant_does_not_import_the_sampler_or_calibration_data():
    """Layering: quant/ quantizes modules; the sampler (diffusion) calls into quant, and the
    calibration data is collected by the sampler, so quant/ imports neither (no cycle)."""
    import ast

    for path in sorted((ROOT / "modiff" / "quant").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        sampler = ("modiff.diffusion", "modiff.calibration")
        bad = {m for m in imported if m and m.startswith(sampler)}
        assert not bad, f"{path.name} imports {bad}"
