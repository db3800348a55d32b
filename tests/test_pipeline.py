"""End-to-end: the Snakemake pipeline on a smoke-sized config, in a copy of the project."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT

from modiff.io import load_images

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def smoke_params(path: Path) -> None:
    params = yaml.safe_load(path.read_text())
    params["bench"].update(batch_sizes=[2], repetitions=2, steps=3, cifar10=False)
    sampling = params["presets"]["digits"]["sampling"]
    sampling.update(n_samples=40, batch_size=20, steps=10)
    params["presets"]["digits"]["calibration"].update(cali_st=5, cali_n=16)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("project")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    smoke_params(dest / "params.yaml")
    return dest


def snakemake(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "XDG_CACHE_HOME": str(project / ".cache")}
    return subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_pipeline_runs_end_to_end_and_reruns_nothing(project):
    run = snakemake(project, "results/report.md")
    assert run.returncode == 0, run.stderr[-3000:]
    images, meta = load_images(project / "results/samples/fp32.npz")
    assert images.shape == (40, 8, 8, 1) and images.dtype == np.uint8
    assert meta["sampling"]["steps"] == 10
    report = (project / "results/report.md").read_text()
    assert "fp32" in report and "FID" in report
    assert (project / "results/grids/fp32.png").stat().st_size > 0

    again = snakemake(project, "results/report.md")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
