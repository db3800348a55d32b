import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Unit tests run the fused MoDiff passes eagerly (compiling costs seconds per test process);
# tests/test_modulation.py checks the compiled ones against them, the pipeline test runs them.
os.environ.setdefault("MODIFF_COMPILE", "0")


def copy_project(dest: Path) -> Path:
    """The project's files as git sees them (tracked and untracked, not ignored) under ``dest``."""
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
    return dest


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)


def tiny_config(**model_overrides) -> dict:
    """A small config of the DDIM UNet family (fast on the CPU)."""
    model = {
        "type": "simple",
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [4],
        "dropout": 0.0,
        "resamp_with_conv": True,
    }
    model.update(model_overrides)
    return {
        "data": {"image_size": 8, "channels": model["in_channels"]},
        "model": model,
        "diffusion": {
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "num_diffusion_timesteps": 1000,
        },
    }


# --- the smoke-sized pipeline: one local run shared by the pipeline and SLURM tests -----------

SMOKE_VARIANTS = {
    "fp32": {"method": "fp32"},
    "qdiff-static-w8a8": {"method": "qdiff", "a_scale": "static", "w_bits": 8, "a_bits": 8},
    "modiff-dynamic-w8a4": {"method": "modiff", "a_scale": "dynamic", "w_bits": 8, "a_bits": 4},
}


def smoke_params(path: Path) -> None:
    """A smoke-sized params.yaml: two variants, 40 images in 2 shards of 2 batches, 10 steps."""
    params = yaml.safe_load(path.read_text())
    params["variants"] = SMOKE_VARIANTS
    params["bench"].update(batch_sizes=[2], repetitions=2, steps=3, cifar10=False, peers=[])
    params["presets"]["digits"]["sampling"].update(n_samples=40, batch_size=10, steps=10, shards=2)
    params["presets"]["digits"]["calibration"].update(cali_st=5, cali_n=16)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run_in(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A console script of this environment (``snakemake``, ``modiff``) run in ``project``."""
    # PYTHONPATH: the copy runs its own modiff, not the editable install of the working tree.
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "XDG_CACHE_HOME": str(project / ".cache"),
           "PYTHONPATH": str(project), **(env or {})}  # fmt: skip
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@dataclass
class SmokeRun:
    project: Path  # a copy of the project with the smoke params.yaml
    result: subprocess.CompletedProcess  # `snakemake --cores 2 results/report.md` there


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    """The smoke pipeline run once, locally, for every test that needs its outputs. Every job's
    log lists the modules it imported (PYTHONPROFILEIMPORTTIME), for the code-deps test."""
    project = copy_project(tmp_path_factory.mktemp("project"))
    smoke_params(project / "params.yaml")
    profile = ("--profile", "workflow/profiles/local", "--cores", "2")
    run = run_in(project, "snakemake", *profile, "results/report.md",
                 env={"PYTHONPROFILEIMPORTTIME": "1"})  # fmt: skip
    return SmokeRun(project, run)
