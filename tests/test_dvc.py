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
from modiff.pipeline import dvc_yaml

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


def test_dvc_yaml_is_generated_from_the_stage_table(tmp_path):
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), "dvc.yaml is stale: run `modiff dvc-yaml`"
    # The check the CLI offers fails on a hand edit.
    edited = tmp_path / "dvc.yaml"
    edited.write_text(dvc_yaml().replace("modiff/fetch.py", "modiff/fetch.py\n    - extra", 1))
    assert main(["dvc-yaml", "--check", "--out", str(edited)]) == 2


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


@pytest.mark.slow
def test_dvc_repro_then_snakemake_adopts_and_survives_push_pull(project, tmp_path):
    tool(project, "dvc", "repro")
    records = yaml.safe_load((project / "results/metrics.json").read_text())
    assert [r["variant"] for r in records] == ["fp32", "modiff-dynamic-w8a4"]
    assert "up to date" in tool(project, "dvc", "status").stdout
    assert "didn't change" in tool(project, "dvc", "repro").stdout
    shown = tool(project, "dvc", "metrics", "show").stdout
    assert "modiff-dynamic-w8a4.fid" in shown or "modiff-dynamic-w8a4" in shown
    tool(project, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()
    tool(project, "git", "add", "-A")
    tool(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock")

    # A changed package module makes stale exactly the stages whose subcommand imports it.
    data_py = project / "modiff/data.py"
    data_py.write_text(data_py.read_text() + "# changed\n")
    stale = set(re.findall(r"^(\w+)@?[\w.-]*:", tool(project, "dvc", "status").stdout, re.M))
    tool(project, "git", "checkout", "--", "modiff/data.py")
    assert stale == {"fid", "fid_damage"}, stale  # the stages reading reference images
    assert "up to date" in tool(project, "dvc", "status").stdout

    # An experiment with one setting changed reruns only what depends on it.
    exp = tool(project, "dvc", "exp", "run", "-S", "bench.repetitions=1").stdout
    assert "Running stage 'bench'" in exp and "Running stage 'sample" not in exp
    assert "bench.repetitions" in tool(project, "dvc", "exp", "show", "--csv").stdout
    tool(project, "git", "checkout", "--", "params.yaml", "dvc.lock")
    tool(project, "dvc", "checkout", "--force")
    # The same change by hand: `dvc params diff` and `dvc metrics diff` against HEAD.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["bench"]["repetitions"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "bench.repetitions" in tool(project, "dvc", "params", "diff").stdout
    tool(project, "dvc", "repro")
    assert "summary.json" in tool(project, "dvc", "metrics", "diff").stdout
    tool(project, "git", "checkout", "--", "params.yaml", "dvc.lock")
    tool(project, "dvc", "checkout", "--force")
    assert "up to date" in tool(project, "dvc", "status").stdout

    # Snakemake adopts DVC's outputs once DVC has vouched for them: nothing to redo after that.
    bench_edit = yaml.safe_load((project / "params.yaml").read_text())
    bench_edit["bench"]["repetitions"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(bench_edit, sort_keys=False))
    refused = tool(project, "bash", "workflow/scripts/adopt_dvc_outputs.sh", check=False)
    assert refused.returncode == 1 and "run 'dvc repro'" in refused.stderr, refused.stderr
    tool(project, "git", "checkout", "--", "params.yaml")
    adopted = tool(project, "bash", "workflow/scripts/adopt_dvc_outputs.sh").stdout
    assert "Nothing to be done" in adopted, adopted[-2000:]
    # Its records hold the settings: a changed setting reruns what it affects, and no more.
    (project / "params.yaml").write_text(yaml.safe_dump(bench_edit, sort_keys=False))
    plan = tool(project, "snakemake", "-n", "results/report.md").stdout
    assert re.search(r"^bench\s+1$", plan, re.M) and "sample_shard" not in plan, plan[-2000:]
    tool(project, "git", "checkout", "--", "params.yaml")

    # A push/pull round trip: DVC restores the files with new times, in its own order.
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
    # Snakemake's records hold checksums: rewritten, unchanged files redo no work, in both tools.
    after = tool(project, "snakemake", "-n", "results/report.md").stdout
    assert "Nothing to be done" in after, after[-3000:]
    assert "up to date" in tool(project, "dvc", "status").stdout
