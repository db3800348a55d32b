"""DVC and Snakemake run the same pipeline: same stages, outputs and settings; DVC round-trips."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, smoke_params

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
    """Every resolved DVC stage: name, outputs, params keys and file deps (default params)."""
    code = (
        "import json\nfrom dvc.repo import Repo\n"
        "from dvc.dependency.param import ParamsDependency\n"
        "print(json.dumps([{'name': s.addressing, 'outs': [str(o.def_path) for o in s.outs],"
        " 'params': sorted(p for d in s.deps if isinstance(d, ParamsDependency) for p in d.params),"
        " 'deps': [str(d.def_path) for d in s.deps if not isinstance(d, ParamsDependency)]}"
        " for s in Repo('.').index.stages]))"
    )
    return yaml.safe_load(tool(project, sys.executable, "-c", code).stdout)


def snakemake_jobs(project: Path) -> dict[str, dict]:
    """Output path -> (rule, settings keys, input files) of every job of a full dry-run."""
    out = tool(project, "snakemake", "-n", "-p", "--forceall", "--cores", "2",
               "results/report.md").stdout  # fmt: skip
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        outputs = re.search(r"^\s+output: (.+)$", block, re.M)
        inputs = re.search(r"^\s+input: (.+)$", block, re.M)
        if rule and outputs:
            keys = sorted(set(re.findall(r"-S '?([\w.]+)=", block)))
            files = inputs.group(1).split(", ") if inputs else []
            for path in outputs.group(1).split(", "):
                jobs[path] = {"rule": rule.group(1), "params": keys, "inputs": files}
    return jobs


def _covers(dep: str, path: str) -> bool:
    """Whether DVC dep ``dep`` (a file or a folder) covers file ``path``."""
    return path == dep or path.startswith(dep.rstrip("/") + "/")


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
            keys, inputs = job["params"], job["inputs"]
            if job["rule"] == "merge_samples":  # settings and inputs are those of its shards
                shard = jobs[out.removesuffix(".npz") + "/shard-0.npz"]
                keys = shard["params"]
                inputs = [f for f in inputs if "/shard-" not in f] + shard["inputs"]
            expected = set(keys) | ({FOREACH_LISTS[base]} if base in FOREACH_LISTS else set())
            assert set(stage["params"]) == expected, (stage["name"], stage["params"], keys)
            # DVC must see every file Snakemake does (a dep folder covers its files): only
            # then does a clean `dvc status` vouch for outputs that Snakemake adopts.
            unseen = [f for f in inputs if not any(_covers(d, f) for d in stage["deps"])]
            assert not unseen, f"DVC stage {stage['name']} lacks deps {unseen}"


@pytest.mark.slow
def test_dvc_repro_then_snakemake_adopts_and_survives_push_pull(project, tmp_path):
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
