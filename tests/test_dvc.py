"""DVC and Snakemake run the same pipeline: same stages, outputs and settings; DVC round-trips."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, smoke_params

from modiff.cli import main
from modiff.codedeps import code_files
from modiff.pipeline import STAGES, generated_files

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def tool(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "XDG_CACHE_HOME": str(project / ".cache"),
           "PYTHONPATH": str(project), "DVC_NO_ANALYTICS": "1", "HOME": str(project)}  # fmt: skip
    result = subprocess.run([*args], cwd=project, env=env, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    if check:
        assert result.returncode == 0, f"{args}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_generated_files_are_up_to_date(tmp_path):
    for path, text in generated_files().items():
        assert (ROOT / path).read_text() == text, f"{path} is stale: run `modiff generate`"
    # The check the CLI offers fails on a hand edit.
    for path in generated_files():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text((ROOT / path).read_text())
    assert main(["generate", "--check", "--root", str(tmp_path)]) == 0
    edited = tmp_path / "dvc.yaml"
    edited.write_text(edited.read_text().replace("deps:", "deps:\n    - extra", 1))
    assert main(["generate", "--check", "--root", str(tmp_path)]) == 2


def test_every_variant_stage_sees_only_its_own_grid_entry(project):
    """DVC resolves per variant: params name the variant's entry, not the whole grid."""
    code = (
        "import json\nfrom dvc.repo import Repo\n"
        "from dvc.dependency.param import ParamsDependency\n"
        "print(json.dumps({s.addressing: sorted(p for d in s.deps if isinstance(d, "
        "ParamsDependency) for p in d.params) for s in Repo('.').index.stages}))"
    )
    params = yaml.safe_load(tool(project, sys.executable, "-c", code).stdout)
    for name in ("fp32", "modiff-dynamic-w8a4"):
        assert f"variants.{name}" in params[f"calibrate@{name}"]
        assert "variants" not in params[f"calibrate@{name}"] + params[f"sample@{name}"]
    assert "sample_fp32" not in params and "fid@fp32" in params  # FP32: an ordinary variant


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = copy_project(tmp_path_factory.mktemp("dvc"))
    smoke_params(dest / "params.yaml")
    # Part of the smoke grid (fp32 and a MoDiff variant, one noise level): DVC runs every stage
    # in a process of its own, and the pipeline test covers the whole grid.
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["variants"] = {k: params["variants"][k] for k in ("fp32", "modiff-dynamic-w8a4")}
    params["damage_check"]["sigmas"] = params["damage_check"]["sigmas"][:1]
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tool(dest, "git", "init", "-q")
    tool(dest, "git", "add", "-A")
    tool(dest, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke")
    return dest


def _commit(project: Path, message: str) -> None:
    tool(project, "git", "add", "-A")
    tool(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def _restore(project: Path, *paths: str) -> None:
    """``paths`` as committed, and DVC's outputs as dvc.lock says: the state every test of the
    reproduced project starts from."""
    tool(project, "git", "checkout", "--", *paths)
    tool(project, "dvc", "checkout", "--force")
    assert "up to date" in tool(project, "dvc", "status").stdout


def _stale(project: Path) -> set[str]:
    """The stages `dvc status` reports changed (a foreach stage once)."""
    return set(re.findall(r"^(\w+)@?[\w.-]*:", tool(project, "dvc", "status").stdout, re.M))


@pytest.fixture(scope="module")
def reproduced(project) -> Path:
    """The project after `dvc repro`, its dvc.lock committed."""
    tool(project, "dvc", "repro")
    _commit(project, "lock")
    return project


@pytest.mark.slow
def test_repro_makes_every_output_and_then_has_nothing_to_do(reproduced):
    records = yaml.safe_load((reproduced / "results/metrics.json").read_text())
    assert [r["variant"] for r in records] == ["fp32", "modiff-dynamic-w8a4"]
    assert "up to date" in tool(reproduced, "dvc", "status").stdout
    assert "didn't change" in tool(reproduced, "dvc", "repro").stdout


@pytest.mark.slow
def test_metrics_and_plots_show(reproduced, tmp_path):
    shown = tool(reproduced, "dvc", "metrics", "show").stdout
    assert "modiff-dynamic-w8a4.fid" in shown or "modiff-dynamic-w8a4" in shown
    tool(reproduced, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()


@pytest.mark.slow
def test_a_docstring_or_comment_edit_leaves_nothing_to_do(reproduced):
    layers = reproduced / "modiff/quant/layers.py"
    text = layers.read_text()
    layers.write_text(text.replace('"""', '"""Reworded. ', 1).replace("\n\n", "\n\n# note\n", 1))
    tool(reproduced, "modiff", "generate")  # after any code edit, as the docs say
    try:
        assert tool(reproduced, "git", "status", "--short").stdout.split() == [
            "M", "modiff/quant/layers.py"]  # fmt: skip
        assert "up to date" in tool(reproduced, "dvc", "status").stdout
    finally:
        _restore(reproduced, "modiff/quant/layers.py")


@pytest.mark.slow
def test_a_changed_constant_makes_exactly_the_stages_that_import_it_stale(reproduced):
    metrics = reproduced / "modiff/metrics.py"
    metrics.write_text(metrics.read_text().replace("FID_CACHE = ", "UNUSED = 1\nFID_CACHE = ", 1))
    tool(reproduced, "modiff", "generate")
    try:
        importing = {name for name, stage in STAGES.items()
                     if "modiff/metrics.py" in code_files(stage.module)}  # fmt: skip
        assert importing == {"fid", "fid_damage"}
        assert _stale(reproduced) == importing
    finally:
        _restore(reproduced, "modiff/metrics.py", "workflow/code_fingerprints.yaml")


@pytest.mark.slow
def test_an_experiment_reruns_only_what_its_setting_affects(reproduced):
    exp = tool(reproduced, "dvc", "exp", "run", "-S", "bench.repetitions=1").stdout
    try:
        assert "Running stage 'bench'" in exp and "Running stage 'sample" not in exp
        assert "bench.repetitions" in tool(reproduced, "dvc", "exp", "show", "--csv").stdout
    finally:
        _restore(reproduced, "params.yaml", "dvc.lock")


@pytest.mark.slow
def test_params_and_metrics_diff_against_head(reproduced):
    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    params["bench"]["repetitions"] = 1
    (reproduced / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert "bench.repetitions" in tool(reproduced, "dvc", "params", "diff").stdout
        tool(reproduced, "dvc", "repro")
        assert "summary.json" in tool(reproduced, "dvc", "metrics", "diff").stdout
    finally:
        _restore(reproduced, "params.yaml", "dvc.lock")


@pytest.mark.slow
def test_snakemake_adopts_dvc_outputs_and_reruns_only_what_a_setting_affects(reproduced):
    bench_edit = yaml.safe_load((reproduced / "params.yaml").read_text())
    bench_edit["bench"]["repetitions"] = 1
    try:
        # Not while DVC's outputs are stale for the settings.
        (reproduced / "params.yaml").write_text(yaml.safe_dump(bench_edit, sort_keys=False))
        refused = tool(reproduced, "bash", "workflow/scripts/adopt_dvc_outputs.sh", check=False)
        assert refused.returncode == 1 and "run 'dvc repro'" in refused.stderr, refused.stderr
        tool(reproduced, "git", "checkout", "--", "params.yaml")
        adopted = tool(reproduced, "bash", "workflow/scripts/adopt_dvc_outputs.sh").stdout
        assert "Nothing to be done" in adopted, adopted[-2000:]
        # Its records hold the settings: a changed setting reruns what it affects, and no more.
        (reproduced / "params.yaml").write_text(yaml.safe_dump(bench_edit, sort_keys=False))
        plan = tool(reproduced, "snakemake", "-n", "results/report.md").stdout
        assert re.search(r"^bench\s+1$", plan, re.M) and "sample_shard" not in plan, plan[-2000:]
    finally:
        _restore(reproduced, "params.yaml")


@pytest.mark.slow
def test_a_push_pull_round_trip_restores_the_files_and_redoes_nothing(reproduced, tmp_path):
    """DVC restores the files with new times, in its own order; Snakemake's records hold
    checksums, so rewritten, unchanged files redo no work in either tool."""
    project = reproduced
    tool(project, "bash", "workflow/scripts/adopt_dvc_outputs.sh")  # Snakemake's records first
    tool(project, "dvc", "remote", "modify", "--local", "storage", "url", str(tmp_path / "remote"))
    outputs = sorted(
        p
        for pattern in (
            "results/samples/*.npz",
            "results/metrics/*.json",
            "results/*.json",
            "data/checkpoints/*",
            "data/calibration/*",
            "data/quant/*",
        )  # fmt: skip
        for p in project.glob(pattern)
    )
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in outputs}
    tool(project, "dvc", "push")
    for p in outputs:
        p.unlink()
    tool(project, "rm", "-rf", ".dvc/cache")
    tool(project, "dvc", "pull")
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in outputs} == digests
    after = tool(project, "snakemake", "-n", "results/report.md").stdout
    assert "Nothing to be done" in after, after[-3000:]
    assert "up to date" in tool(project, "dvc", "status").stdout
