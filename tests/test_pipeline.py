"""End-to-end: the Snakemake pipeline on a smoke-sized config, in a copy of the project."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, run_in

from modiff.codedeps import code_files
from modiff.io import load_images
from modiff.pipeline import COMMANDS, STAGES

pytestmark = pytest.mark.slow

RECORD_FIELDS = {"variant", "method", "a_scale", "w_bits", "a_bits", "backend", "n_samples",
                 "steps", "fid", "kid", "psnr_vs_fp32", "step_ms", "speedup_vs_fp32"}  # fmt: skip


@pytest.fixture(scope="module")
def project(smoke_run) -> Path:
    return smoke_run.project


def snakemake(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_in(project, "snakemake", "--cores", "2", *args)


def test_pipeline_runs_end_to_end_and_reruns_nothing(smoke_run):
    project, result = smoke_run.project, smoke_run.result
    assert result.returncode == 0, result.stderr[-3000:]
    images, meta = load_images(project / "results/samples/fp32.npz")
    assert images.shape == (40, 8, 8, 1) and images.dtype == np.uint8
    assert meta["sampling"]["steps"] == 10 and meta["shards"] == 2

    records = json.loads((project / "results/metrics.json").read_text())
    assert [r["variant"] for r in records] == ["fp32", "qdiff-static-w8a8", "modiff-dynamic-w8a4"]
    for r in records:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert r["n_samples"] == 40 and r["steps"] == 10 and r["fid"] > 0
        assert r["step_ms"] > 0 and r["speedup_vs_fp32"] > 0
    assert records[0]["psnr_vs_fp32"] is None and records[1]["psnr_vs_fp32"] > 20
    assert records[2]["method"] == "modiff" and records[2]["a_scale"] == "dynamic"

    report = (project / "results/report.md").read_text()
    assert "PTQ (nearest rounding) + MoDiff, dynamic per-tensor (LTQ) scales" in report
    assert "W8A4" in report
    assert "Can the metrics see damage?" in report
    for png in ["plots/fid_vs_abits.png", "grids/fp32.png", "grids/modiff-dynamic-w8a4.png"]:
        assert (project / "results" / png).stat().st_size > 0

    again = snakemake(project, "results/report.md")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


def dry_run_jobs(project: Path, *args: str) -> list[dict]:
    """Every job of a dry-run: its rule, log and input files."""
    out = snakemake(project, "-n", "results/report.md", *args).stdout  # --configfile takes a list
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        log = re.search(r"^\s+log: (.+)$", block, re.M)
        inputs = re.search(r"^\s+input: (.+)$", block, re.M)
        if rule and log:
            files = inputs.group(1).split(", ") if inputs else []
            jobs.append({"rule": rule.group(1), "log": log.group(1), "inputs": set(files)})
    return jobs


def imported_package_files(log: str) -> set[str]:
    """The modiff files a job imported, from its log's PYTHONPROFILEIMPORTTIME lines."""
    modules = re.findall(r"^import time:.*\|\s+(modiff(?:\.\w+)*)\s*$", log, re.M)
    files = set()
    for module in modules:
        path = Path(*module.split("."))
        files.add(f"{path}.py" if Path(ROOT, f"{path}.py").is_file() else f"{path}/__init__.py")
    return files


# The command line's glue: it turns options into a call (and sets up logging), no stage's work.
GLUE = {"modiff/cli.py", "modiff/pipeline.py", "modiff/codedeps.py", "modiff/errors.py",
        "modiff/runtime.py"}  # fmt: skip


def test_every_job_imports_only_its_code(project):
    """Every package module a job imported while it ran is in its stage's code (the closure
    whose fingerprint both tools track), or is the command line's glue."""
    jobs = dry_run_jobs(project, "--forceall", "-p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    per_item = {"variants": len(params["variants"]),
                "sigmas": len(params["damage_check"]["sigmas"])}  # fmt: skip
    shards = params["presets"]["digits"]["sampling"]["shards"]
    expected = {name: per_item.get(stage.foreach, 1) for name, stage in STAGES.items()}
    expected.pop("sample")  # Snakemake samples in shards and merges them
    expected |= {"sample_shard": per_item["variants"] * shards,
                 "merge_samples": per_item["variants"]}  # fmt: skip
    ran = {rule: sum(job["rule"] == rule for job in jobs) for rule in {j["rule"] for j in jobs}}
    assert ran == expected  # every job of the pipeline, each once per item
    for job in jobs:
        imported = imported_package_files((project / job["log"]).read_text())
        assert {"modiff/cli.py", f"modiff/stages/{job['rule']}.py"} & imported, job
        command = {"sample_shard": "sample", "merge_samples": "merge"}.get(job["rule"])
        stage = COMMANDS[command] if command else STAGES[job["rule"]]
        unlisted = imported - GLUE - set(code_files(stage.module))
        assert not unlisted, (job["rule"], unlisted)


def _params_changed(project: Path) -> set[str]:
    """The rules Snakemake would rerun because their params (code fingerprint) changed."""
    plan = snakemake(project, "-n", "results/report.md").stdout
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", plan)
    return {re.match(r"(?:local)?rule (\w+):", b).group(1) for b in blocks
            if re.match(r"(?:local)?rule \w+:", b) and "Params have changed" in b}  # fmt: skip


def _edited(path: Path, old: str, new: str):
    """``path`` with ``old`` replaced by ``new`` while the block runs (then as it was)."""
    import contextlib

    @contextlib.contextmanager
    def edit():
        text, stat = path.read_text(), path.stat()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))
        try:
            yield
        finally:
            path.write_text(text)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    return edit()


def test_a_docstring_or_comment_edit_reruns_nothing(project):
    layers = project / "modiff/quant/layers.py"
    with _edited(layers, '"""', '"""Reworded. '), _edited(layers, "\n\n", "\n\n# note\n"):
        plan = snakemake(project, "-n", "results/report.md")
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout[-2000:]


def test_a_changed_constant_reruns_exactly_the_stages_that_import_it(project):
    metrics = project / "modiff/metrics.py"
    importing = {name for name, stage in STAGES.items()
                 if "modiff/metrics.py" in code_files(stage.module)}  # fmt: skip
    assert importing == {"fid", "fid_damage"}  # the stages scoring samples
    with _edited(metrics, "FID_CACHE = ", "UNUSED = 1\nFID_CACHE = "):
        assert _params_changed(project) == importing


def test_merged_shards_equal_one_unsharded_run(project):
    name = "modiff-dynamic-w8a4"  # per-tensor dynamic scales: batch composition matters
    merged, _ = load_images(project / f"results/samples/{name}.npz")
    whole = run_in(project, "modiff", "sample", "--variant", name, "--qparams",
                   f"data/quant/{name}.pt", "--ckpt", "data/checkpoints/digits.ckpt",
                   "--samples", "whole.npz")  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-2000:]
    unsharded, _ = load_images(project / "whole.npz")
    np.testing.assert_array_equal(merged, unsharded)


def test_an_interrupted_run_resumes_with_the_missing_shard_only(project):
    merged = project / "results/samples/fp32.npz"
    images, _ = load_images(merged)
    merged_bytes = merged.read_bytes()
    assert not list((project / "results/samples").glob("*/shard-*.npz")), "shards are temporary"
    # A run killed while sampling FP32: one shard finished, the other and all after it not.
    for later in ["samples/fp32.npz", "metrics", "metrics.json", "report.md", "grids/fp32.png"]:
        path = project / "results" / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    kept = project / "results/samples/fp32/shard-0.npz"
    assert snakemake(project, str(kept.relative_to(project))).returncode == 0
    plan = snakemake(project, "-n", "results/report.md")
    assert re.search(r"^sample_shard\s+1$", plan.stdout, re.M), plan.stdout
    assert "calibrate" not in plan.stdout
    result = snakemake(project, "results/report.md")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^sample_shard\s+1$", result.stdout + result.stderr, re.M)
    np.testing.assert_array_equal(load_images(merged)[0], images)
    assert merged.read_bytes() == merged_bytes  # the file too: checksums see no change
    assert not kept.exists()


def test_calibration_reruns_to_the_same_bytes(project):
    name = "qdiff-static-w8a8"
    again = run_in(project, "modiff", "calibrate", "--variant", name, "--calib",
                   "data/calibration/digits.pt", "--ckpt", "data/checkpoints/digits.ckpt",
                   "--qparams", "again.pt")  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert (project / "again.pt").read_bytes() == (project / f"data/quant/{name}.pt").read_bytes()


def test_sampling_more_images_does_not_recalibrate(project, tmp_path):
    """Calibration depends on the sampler's steps, skip type and eta, not on n_samples."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["presets"]["digits"]["sampling"]["n_samples"] = 60
    more = tmp_path / "more.yaml"
    more.write_text(yaml.safe_dump(params, sort_keys=False))  # key order is part of the params
    plan = snakemake(project, "-n", "results/report.md", "--configfile", str(more))
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = set(re.findall(r"^(?:local)?rule (\w+):", plan.stdout, re.M))
    assert "sample_shard" in jobs and not jobs & {"calib_data", "calibrate"}, jobs


def test_fp32_is_not_redone_by_quantization_settings(project, tmp_path):
    """fp32 is an ordinary variant, but its jobs do not read quant or the calibration data."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["quant"]["warmup"] = "quantized"
    params["presets"]["digits"]["calibration"]["cali_n"] = 8
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(params, sort_keys=False))
    jobs = dry_run_jobs(project, "--configfile", str(changed))
    logs = {job["log"] for job in jobs}
    assert "results/logs/calibrate_qdiff-static-w8a8.log" in logs, logs
    assert not {log for log in logs if "fp32" in log}, logs
