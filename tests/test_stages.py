"""The stage table (modiff/pipeline.py): code deps derived from imports, and dvc.yaml from it."""

import pytest

from modiff.pipeline import STAGES, code_deps, dvc_stage


def test_code_deps_follow_the_handlers_imports():
    # The stale hand-kept lists of before: fid reads reference images through data.py; calibrate
    # runs config, io, fetch and runtime; a model is models/__init__.py and models/unet.py.
    assert {"modiff/data.py", "modiff/classifier.py", "modiff/metrics.py"} <= set(code_deps("fid"))
    calibrate = set(code_deps("calibrate"))
    assert {
        f"modiff/{m}.py" for m in ("config", "io", "fetch", "runtime", "calibration")
    } <= calibrate
    assert {"modiff/models/__init__.py", "modiff/models/unet.py"} <= set(code_deps("sample"))
    # Data files a module names, and the package __init__s that run on import.
    assert "modiff/params.schema.yaml" in code_deps("fetch")
    assert {"modiff/__init__.py", "modiff/quant/__init__.py"} <= set(code_deps("sample"))
    # Only what can run: sampling never imports calibration or the metrics.
    assert not {"modiff/calibration.py", "modiff/metrics.py"} & set(code_deps("sample"))
    assert code_deps("grid") == tuple(sorted(code_deps("grid")))


def test_code_deps_of_an_unknown_command_are_an_error():
    with pytest.raises(ValueError, match="no subcommand 'nope'"):
        code_deps("nope")


def test_every_stage_runs_a_subcommand_and_names_its_files():
    for name, stage in STAGES.items():
        assert code_deps(stage.command), name
        named = {f"{{input.{k}}}" for k in stage.inputs} | {
            f"{{output.{k}}}" for k in stage.outputs
        }
        used = {f"{{{f}}}" for f in _fields(stage.args) if f.startswith(("input.", "output."))}
        assert used <= named, (name, used - named)


def _fields(template: str) -> list[str]:
    import string

    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def test_fp32_jobs_skip_what_only_quantization_reads():
    calibrate = STAGES["calibrate"]
    assert calibrate.settings_for("fp32") == ("variants.{variant}",)
    assert calibrate.inputs_for("fp32") == {}
    assert "quant" in calibrate.settings_for("qdiff-static-w8a8")


def test_a_dvc_stage_per_variant_depends_on_its_own_entry():
    stage = dvc_stage(STAGES["calibrate"])
    assert stage["foreach"] == "${variants}"
    assert "variants.${key}" in stage["do"]["params"] and "variants" not in stage["do"]["params"]
    assert stage["do"]["cmd"].startswith("modiff calibrate --variant ${key}")
    assert "presets.${preset}.sampling.steps" in stage["do"]["params"]
