"""The pipeline as SLURM jobs on a real one-node cluster (scripts/slurm_cluster.sh).

In copies of the project: the slurm profile gives the same results as the local profile, and a
job failing on the cluster fails the run; after the fix only that job and its dependents rerun.
Skips without root or when the cluster cannot start, unless MODIFF_REQUIRE_SLURM=1 (CI).
"""

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, SmokeRun, copy_project, smoke_params

BIN = Path(sys.executable).parent
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
PROFILES = ROOT / "workflow" / "profiles"
TIMEOUT_S = 900
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")
RULE = re.compile(r"^(?:local)?rule (\w+):", re.MULTILINE)
# Outputs (and their logs) that the failed job and its fix may touch; all others must not change.
REMADE = ("fp32-noise", "damage", "report")


def unavailable(reason: str) -> None:
    if os.environ.get("MODIFF_REQUIRE_SLURM") == "1":
        pytest.fail(f"MODIFF_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(f"no SLURM test cluster: {reason}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A test cluster started here (stopped after the module): the environment its clients need."""
    if os.geteuid() != 0:
        unavailable("installing and starting munge/slurmctld/slurmd needs root")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "MODIFF_SLURM_DIR": str(state)}

    def script(command: str, limit_s: int) -> subprocess.CompletedProcess:
        args = ["timeout", "-k", "10", str(limit_s), str(SCRIPT), command]
        return subprocess.run(args, env=env, capture_output=True, text=True)

    for command, limit_s in (("install", 600), ("up", 120)):
        run = script(command, limit_s)
        if run.returncode != 0:
            script("down", 60)
            unavailable(
                f"`slurm_cluster.sh {command}` exited {run.returncode}: {run.stderr[-1500:]}"
            )
    yield {"SLURM_CONF": str(state / "slurm.conf")}
    script("down", 60)


def override_profile(dest: Path, slurm_conf: Path) -> Path:
    """Overrides of the slurm profile for the test cluster: fast polling, kept logs, no retries,
    its partition, memory requests capped to fit the node."""
    profile = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    conf = slurm_conf.read_text()
    node_mb = int(re.search(r"RealMemory=(\d+)", conf).group(1))
    partition = re.search(r"PartitionName=(\S+)", conf).group(1)

    def capped(res: dict) -> dict:
        return {**res, "mem_mb": min(res["mem_mb"], node_mb // 2)} if "mem_mb" in res else res

    override = {
        "retries": 0,
        "latency-wait": 5,
        "slurm-init-seconds-before-status-checks": 2,
        "slurm-keep-successful-logs": True,
        "default-resources": capped(profile["default-resources"]) | {"slurm_partition": partition},
        "set-resources": {rule: capped(res) for rule, res in profile["set-resources"].items()},
    }
    (dest / "config.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
    return dest


@dataclass
class Run:
    returncode: int
    log: str  # stdout and stderr


def snakemake(project: Path, *args: str, env: dict[str, str]) -> Run:
    # PYTHONPATH: jobs run the copy's package, not the editable install's live working tree.
    cache = str(project / ".cache")
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "PYTHONPATH": str(project),
        "XDG_CACHE_HOME": cache,
        **env,
    }
    # A waiting Snakemake ignores SIGTERM: `timeout -k` follows with SIGKILL.
    cmd = ["timeout", "-k", "30", str(TIMEOUT_S), str(BIN / "snakemake"), *args]
    run = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    return Run(run.returncode, run.stdout + run.stderr)


@dataclass
class Runs:
    local: Path
    slurm: Path
    slurm_args: tuple[str, ...]
    env: dict[str, str]
    run: Run


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, cluster: dict[str, str], smoke_run: SmokeRun
) -> Runs:
    """The smoke pipeline with the slurm profile, in a copy of the project, next to the shared
    local run (conftest's ``smoke_run``, whose outputs it must reproduce)."""
    assert smoke_run.result.returncode == 0, smoke_run.result.stderr[-3000:]
    local, slurm = smoke_run.project, copy_project(tmp_path_factory.mktemp("slurm"))
    smoke_params(slurm / "params.yaml")
    # A part of the local run's grid (its images do not depend on the other entries): every
    # job on this 2-core node runs alone and costs about 14 s of the plugin's status polling.
    params = yaml.safe_load((slurm / "params.yaml").read_text())
    params["variants"] = {k: params["variants"][k] for k in ("fp32", "modiff-dynamic-w8a4")}
    params["damage_check"]["sigmas"] = params["damage_check"]["sigmas"][:1]
    (slurm / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    override = override_profile(tmp_path_factory.mktemp("profile"), Path(cluster["SLURM_CONF"]))
    args = ("--profile", "workflow/profiles/slurm", "--profile", str(override))
    run = snakemake(slurm, *args, "results/report.md", env=cluster)
    return Runs(local, slurm, args, cluster, run)


def cluster_jobs(log: str) -> int:
    """Jobs of the run that went to SLURM: all but the Snakefile's localrules (light ones)."""
    local = re.findall(r"^localrule (\w+):", log, re.MULTILINE)
    assert set(local) <= {"fetch_checkpoint", "merge_samples", "damage", "grid", "gather", "report"}
    return int(re.search(r"^total\s+(\d+)", log, re.MULTILINE).group(1)) - len(local)


def sample_meta(path: Path) -> tuple[np.ndarray, dict]:
    with np.load(path, allow_pickle=False) as f:
        return f["images"], json.loads(str(f["meta"]))


def test_gpu_profile_only_adds_gpus_and_cuda():
    cpu, gpu = (
        yaml.safe_load((PROFILES / name / "config.yaml").read_text())
        for name in ("slurm", "slurm-gpu")
    )
    assert gpu["config"] == {"device": "cuda"}
    res = gpu["set-resources"]
    assert {"sample_shard"} <= {rule for rule in res if res[rule].get("gpu") == 1}
    without_gpus = {rule: {k: v for k, v in r.items() if k != "gpu"} for rule, r in res.items()}
    assert without_gpus == cpu["set-resources"]


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_jobs_give_the_local_results(runs: Runs):
    assert runs.run.returncode == 0, runs.run.log[-3000:]
    jobids = SUBMITTED.findall(runs.run.log)
    assert len(jobids) == cluster_jobs(runs.run.log) >= 6, runs.run.log[-3000:]
    # every job's output was written by slurmd: one log per SLURM job id
    logs = {p.stem for p in (runs.slurm / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert logs == set(jobids)

    samples = sorted(p.name for p in (runs.slurm / "results" / "samples").glob("*.npz"))
    assert len(samples) == 3  # FP32, the variant, FP32 with noise: each also made locally
    for name in samples:
        (local_images, local_meta), (images, meta) = (
            sample_meta(project / "results" / "samples" / name)
            for project in (runs.local, runs.slurm)
        )
        assert images.dtype == local_images.dtype and images.tobytes() == local_images.tobytes()
        assert meta == local_meta
    metrics = sorted(p.name for p in (runs.slurm / "results" / "metrics").glob("*.json"))
    assert len(metrics) == 3
    for name in metrics:
        local_json, slurm_json = (
            json.loads((project / "results" / "metrics" / name).read_text())
            for project in (runs.local, runs.slurm)
        )
        assert slurm_json == local_json, name


@pytest.mark.slow
@pytest.mark.slurm
def test_failed_slurm_job_fails_the_run_and_only_it_reruns(runs: Runs):
    assert runs.run.returncode == 0, "the SLURM run failed (see the test above)"
    project = runs.slurm
    damaged = next((project / "results/samples").glob("fp32-noise*.npz"))
    metrics = project / "results/metrics" / f"{damaged.stem}.json"
    good, scores = damaged.read_bytes(), metrics.read_text()
    kept = {
        p: p.stat().st_mtime_ns
        for p in [*(project / "results").rglob("*"), *(project / "data/checkpoints").glob("*")]
        if p.is_file() and not any(part in str(p.relative_to(project)) for part in REMADE)
    }
    assert any("samples" in str(p) for p in kept) and any("bench" in str(p) for p in kept)

    # One job's input truncated: that job reruns (its input changed) and fails on the node.
    damaged.write_bytes(good[: len(good) // 2])
    failed = snakemake(project, *runs.slurm_args, "results/report.md", env=runs.env)
    assert failed.returncode != 0, failed.log[-3000:]
    assert "Error in rule fid_damage" in failed.log, failed.log[-3000:]
    assert set(RULE.findall(failed.log)) == {"fid_damage"}
    (jobid,) = SUBMITTED.findall(failed.log)
    assert list((project / ".snakemake" / "slurm_logs").rglob(f"rule_fid_damage/**/{jobid}.log"))
    reason = project / f"results/logs/fid_damage_{damaged.stem.removeprefix('fp32-noise')}.log"
    assert "is not a complete modiff samples file" in reason.read_text()

    # The fix the error message gives: rerun the step that wrote the file.
    fixed = snakemake(project, *runs.slurm_args, "results/report.md", "-R", "damage", env=runs.env)
    assert fixed.returncode == 0, fixed.log[-3000:]
    assert set(RULE.findall(fixed.log)) == {"damage", "fid_damage", "report"}
    assert damaged.read_bytes() == good and metrics.read_text() == scores
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
