"""The stage table (modiff/pipeline.py): stage modules, code fingerprints, dvc.yaml from it."""

import ast
import importlib
import inspect
import shutil

import pytest

from modiff import codedeps
from modiff.codedeps import code_files, fingerprint
from modiff.pipeline import COMMANDS, STAGES, dvc_stage


def test_code_files_follow_the_stage_modules_imports():
    # fid reads reference images through data.py; calibrate runs config, io, fetch and runtime;
    # a model is models/__init__.py and models/unet.py.
    fid = set(code_files(STAGES["fid"].module))
    assert {"modiff/data.py", "modiff/classifier.py", "modiff/metrics.py"} <= fid
    calibrate = set(code_files(STAGES["calibrate"].module))
    assert {
        f"modiff/{m}.py" for m in ("config", "io", "fetch", "runtime", "calibration")
    } <= calibrate
    sample = set(code_files(STAGES["sample"].module))
    assert {"modiff/models/__init__.py", "modiff/models/unet.py"} <= sample
    # The package __init__s that run on import.
    assert {"modiff/__init__.py", "modiff/stages/__init__.py", "modiff/quant/__init__.py"} <= sample
    # Only what can run: sampling never imports calibration or the metrics; nothing imports the
    # command line or the stage table's generator of dvc.yaml.
    assert not {"modiff/calibration.py", "modiff/metrics.py"} & sample
    for stage in COMMANDS.values():
        assert "modiff/cli.py" not in code_files(stage.module), stage.command


def test_every_stage_runs_a_module_whose_run_takes_its_declared_files():
    for command, stage in COMMANDS.items():
        run = importlib.import_module(stage.module).run
        arguments = set(inspect.signature(run).parameters) - {"params"}
        declared = {*stage.inputs, *stage.outputs}
        assert declared <= arguments, (command, declared - arguments)
        item = {"variants": "variant", "sigmas": "sigma"}.get(stage.foreach or "")
        assert stage.item_argument == (item in arguments), command
        if stage.settings:
            assert "params" in inspect.signature(run).parameters, command


def test_fp32_jobs_skip_what_only_quantization_reads():
    calibrate = STAGES["calibrate"]
    assert calibrate.settings_for("fp32") == ("variants.{variant}",)
    assert calibrate.inputs_for("fp32") == {}
    assert "quant" in calibrate.settings_for("qdiff-static-w8a8")


def test_a_dvc_stage_per_variant_depends_on_its_own_entry_and_code():
    stage = dvc_stage("calibrate", STAGES["calibrate"])
    assert stage["foreach"] == "${variants}"
    params = stage["do"]["params"]
    assert "variants.${key}" in params and "variants" not in params
    assert {"workflow/code_fingerprints.yaml": ["calibrate"]} in params
    assert stage["do"]["cmd"].startswith("modiff calibrate --variant ${key} --calib ")
    assert "presets.${preset}.sampling.steps" in params
    assert not any(dep.endswith(".py") for dep in stage["do"]["deps"])  # code is a param


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the package whose files the tests edit; codedeps reads it instead."""
    root = tmp_path / "project"
    shutil.copytree(codedeps.PACKAGE, root / "modiff",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    monkeypatch.setattr(codedeps, "PACKAGE", root / "modiff")
    monkeypatch.setattr(codedeps, "ROOT", root)
    codedeps.closure.cache_clear()
    yield root / "modiff"
    codedeps.closure.cache_clear()


def _fingerprints() -> dict[str, str]:
    return {command: fingerprint(stage.module) for command, stage in COMMANDS.items()}


def test_prose_edits_leave_every_fingerprint_as_it_was(package_copy):
    before = _fingerprints()
    layers = package_copy / "quant/layers.py"
    text = layers.read_text()
    tree = ast.parse(text)
    docstring = ast.get_docstring(tree, clean=False)
    edited = text.replace(docstring, docstring + "\nMore words.", 1)
    edited = edited.replace("\n\n", "\n\n# a comment\n", 1) + "\n# and one at the end\n"
    layers.write_text(edited)
    assert layers.read_text() != text
    assert _fingerprints() == before


def test_a_changed_constant_changes_exactly_the_stages_that_import_it(package_copy):
    before = _fingerprints()
    quantizer = package_copy / "quant/quantizer.py"
    quantizer.write_text(quantizer.read_text().replace("SEARCH_STEPS = 80", "SEARCH_STEPS = 81"))
    after = _fingerprints()
    changed = {command for command in before if before[command] != after[command]}
    importing = {command for command, stage in COMMANDS.items()
                 if "modiff/quant/quantizer.py" in code_files(stage.module)}  # fmt: skip
    assert changed == importing
    assert {"calibrate", "sample", "bench"} <= changed
    assert not {"fid", "grid", "damage", "gather", "report", "merge", "fetch"} & changed


def _package_imports() -> dict[str, set[str]]:
    """Each package module's imports of other package modules, anywhere in its code; ``from
    pkg import submodule`` imports the submodule (the package is already initialising)."""
    files = {}
    for path in codedeps.PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(codedeps.ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        found = set()
        for imported, names in codedeps.import_statements(ast.parse(path.read_text()), package):
            submodules = {f"{imported}.{name}" for name in names} & set(files)
            found |= submodules or {imported}
        edges[module] = (found & set(files)) - {module}
    return edges


def test_the_package_has_no_import_cycle():
    edges, finished, path = _package_imports(), set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError(
                "import cycle: " + " -> ".join([*path[path.index(module) :], module])
            )
        if module in finished:
            return
        path.append(module)
        for imported in sorted(edges[module]):
            visit(imported)
        path.pop()
        finished.add(module)

    for module in sorted(edges):
        visit(module)
    assert "modiff.quant" not in edges["modiff.diffusion"] | edges["modiff.stages.fid"]
