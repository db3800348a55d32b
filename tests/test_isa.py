"""Every native test again with oneDNN capped to the instruction sets without VNNI.

oneDNN picks its kernels once per process, from ``ONEDNN_MAX_CPU_ISA`` and the CPU: a VNNI
machine would otherwise never run the saturating AVX2/SSE4.1 kernels that other machines of
this project have. Each cap reruns the tests marked ``native`` in a fresh pytest process;
``tests/test_kernels.py::test_probe_agrees_with_the_cpu`` checks there that the cap took.
"""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from modiff.quant import kernels

# The tests each cap reruns: OpenVINO's CPU plugin needs AVX2 (the backend refuses below it).
CAPS = {"AVX2": "native or openvino", "SSE41": "native"}


@pytest.mark.slow
@pytest.mark.parametrize("isa", CAPS)
def test_native_tests_pass_with_onednn_capped_to(isa):
    if "avx2" not in kernels.cpu_flags() or not kernels.available():
        pytest.skip("oneDNN's x86 int8 kernels need an x86 CPU with AVX2")
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        pytest.skip("this process already runs under a capped ISA")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    command = [sys.executable, "-m", "pytest", "-q", "-m", CAPS[isa],
               "-p", "no:cacheprovider", str(ROOT / "tests")]  # fmt: skip
    run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, f"under ONEDNN_MAX_CPU_ISA={isa}:\n{run.stdout[-6000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == _selected(CAPS[isa]), summary  # every one ran
    assert "skipped" not in summary, summary


def _selected(marker: str) -> int:
    """How many tests ``-m marker`` selects (collected here, without running them)."""
    command = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", marker,
               "-p", "no:cacheprovider", str(ROOT / "tests")]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    counted = re.search(r"(\d+)(?:/\d+)? tests? collected", run.stdout)
    assert counted and int(counted.group(1)) > 0, run.stdout[-2000:]
    return int(counted.group(1))
