"""DVC and Snakemake run the same pipeline: same stages, outputs and settings; DVC round-trips."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_project
from test_pipeline import smoke_params

BIN = Path(sys.executable).parent
# DVC stage (before '@') -> the Snakemake rule producing its outputs.
RULE_OF_STAGE = {
    "fetch_checkpoint": "fetch_checkpoint",
    "calib_data": "calib_data",
    "calibrate": "calibrate",
    "sample_fp32": "merge_samples",
    "sample": "merge_samples",
    "damage": "damage",
    "fid_fp32": "fid",
    "fid": "fid",
    "fid_damage": "fid",
    "grid_fp32": "grid",
    "grid": "grid",
    "bench": "bench",
    "gather": "gather",
    "report": "report",
}
# DVC's foreach cannot name one list item as a param: such stages list the whole list.
FOREACH_LISTS = {"calibrate": "variants", "damage": "damage_check"}


def tool(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "XDG_CACHE_HOME": str(project / ".cache"),
           "PYTHONPATH": str(project), "DVC_NO_ANALYTICS": "1", "HOME": str(project)}  # fmt: skip
    result = subprocess.run([*args], cwd=project, env=env, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    if check:
        assert result.returncode == 0, f"{args}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def dvc_stages(project: Path) -> list[dict]:
    """Every resolved DVC stage: name, outputs and params keys (default params)."""
    code = (
        "import json\nfrom dvc.repo import Repo\n"
        "from dvc.dependency.param import ParamsDependency\n"
        "print(json.dumps([{'name': s.addressing, 'outs': [str(o.def_path) for o in s.outs],"
        " 'params': sorted(p for d in s.deps if isinstance(d, ParamsDependency) for p in d.params)}"
        " for s in Repo('.').index.stages]))"
    )
    return yaml.safe_load(tool(project, sys.executable, "-c", code).stdout)


def snakemake_jobs(project: Path) -> dict[str, dict]:
    """Output path -> (rule, settings keys) of every job of a full Snakemake dry-run."""
    out = tool(project, "snakemake", "-n", "-p", "--forceall", "--cores", "2",
               "results/report.md").stdout  # fmt: skip
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        outputs = re.search(r"^\s+output: (.+)$", block, re.M)
        if rule and outputs:
            keys = sorted(set(re.findall(r"-S '?([\w.]+)=", block)))
            for path in outputs.group(1).split(", "):
                jobs[path] = {"rule": rule.group(1), "params": keys, "block": block}
    return jobs


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = copy_project(tmp_path_factory.mktemp("dvc"))
    smoke_params(dest / "params.yaml")
    tool(dest, "git", "init", "-q")
    tool(dest, "git", "add", "-A")
    tool(dest, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke")
    return dest


def test_every_dvc_stage_matches_its_snakemake_rule(project):
    stages = dvc_stages(project)
    jobs = snakemake_jobs(project)
    assert {s["name"].split("@")[0] for s in stages} == set(RULE_OF_STAGE)
    for stage in stages:
        base = stage["name"].split("@")[0]
        for out in stage["outs"]:
            assert out in jobs, f"no Snakemake job makes {out} (DVC stage {stage['name']})"
            job = jobs[out]
            assert job["rule"] == RULE_OF_STAGE[base], (stage["name"], out, job["rule"])
            keys = job["params"]
            if job["rule"] == "merge_samples":  # the settings are those of its shards
                shard = out.removesuffix(".npz") + "/shard-0.npz"
                keys = jobs[shard]["params"]
            expected = set(keys) | ({FOREACH_LISTS[base]} if base in FOREACH_LISTS else set())
            assert set(stage["params"]) == expected, (stage["name"], stage["params"], keys)


@pytest.mark.slow
def test_dvc_repro_push_pull_and_snakemake_after_checkout(project, tmp_path):
    tool(project, "dvc", "repro")
    records = yaml.safe_load((project / "results/metrics.json").read_text())
    assert [r["variant"] for r in records] == ["fp32", "qdiff-static-w8a8", "modiff-dynamic-w8a4"]
    assert "up to date" in tool(project, "dvc", "status").stdout
    assert "didn't change" in tool(project, "dvc", "repro").stdout
    shown = tool(project, "dvc", "metrics", "show").stdout
    assert "modiff-dynamic-w8a4.fid" in shown or "modiff-dynamic-w8a4" in shown
    tool(project, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()
    tool(project, "git", "add", "-A")
    tool(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock")

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

    # Snakemake takes over the outputs, DVC records them, a push/pull round trip restores them.
    tool(project, "snakemake", "--cores", "2", "results/report.md")
    tool(project, "dvc", "commit", "--force")
    tool(project, "dvc", "remote", "modify", "--local", "storage", "url", str(tmp_path / "remote"))
    outputs = sorted(
        p
        for pattern in (
            "results/samples/*.npz",
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
    # Not yet true: Snakemake reruns jobs whose inputs `dvc pull` rewrote (issue 5 stays open).
