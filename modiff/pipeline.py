"""The pipeline, described once: each stage's command, files, settings and code.

Snakemake's rules (``workflow/rules/*.smk``) read this table; DVC's ``dvc.yaml`` is generated
from it (``modiff dvc-yaml``; a test checks the committed file is up to date). A stage's code
deps are not listed: they are the package files its subcommand can import (:func:`code_deps`),
so a change to any of them reruns the stage in both tools.

Paths and settings may hold ``{preset}`` (the selected preset), ``{variant}`` (a name of
params.yaml's ``variants``) and ``{sigma}`` (a noise level of ``damage_check.sigmas``). A
setting ``@section`` is ``presets.<preset>.section``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import yaml

from modiff.config import calibration_path, checkpoint_path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
FOREACH = {"variants": "variants", "sigmas": "damage_check.sigmas"}  # what a stage runs once per


@dataclass(frozen=True)
class Each:
    """All files of ``pattern`` over a foreach (``variants`` or ``sigmas``): one input of a stage
    that reads them together. DVC, whose dep list cannot follow params, depends on the folder."""

    pattern: str
    over: str


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: ``modiff <command> <args>``, run once or once per ``foreach``.

    ``args`` refers to files as ``{input.name}`` and ``{output.name}``. ``quantized_only`` names
    the inputs and settings the FP32 variant does not use (its calibrate job writes a file saying
    "no quantization"): Snakemake leaves them out of its job; DVC, which cannot, reruns it to the
    same bytes.
    """

    command: str
    args: str
    outputs: dict[str, str]
    inputs: dict[str, str | Each] = field(default_factory=dict)
    settings: tuple[str, ...] = ()
    foreach: str | None = None
    quantized_only: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()  # outputs that are DVC metrics
    plots: dict[str, dict] = field(default_factory=dict)  # outputs that are DVC plots: props

    def _used(self, key: str, variant: str | None) -> bool:
        return not (variant == "fp32" and key in self.quantized_only)

    def settings_for(self, variant: str | None = None) -> tuple[str, ...]:
        """The params keys a job reads (for the FP32 variant: fewer, see ``quantized_only``)."""
        return tuple(k for k in self.settings if self._used(k, variant))

    def inputs_for(self, variant: str | None = None) -> dict[str, str | Each]:
        return {k: v for k, v in self.inputs.items() if self._used(k, variant)}


def params_key(setting: str) -> str:
    """A table setting as a params.yaml key: ``@section`` is ``presets.{preset}.section``."""
    return "presets.{preset}." + setting[1:] if setting.startswith("@") else setting


CHECKPOINT = str(checkpoint_path("{preset}"))
CALIBRATION = str(calibration_path("{preset}"))
SAMPLES = "results/samples/{variant}.npz"
FP32_SAMPLES = "results/samples/fp32.npz"
DAMAGED = "results/samples/fp32-noise{sigma}.npz"
BENCH = "results/bench.json"
MODEL = ("@model", "@data", "@diffusion")
# The sampler settings calibration depends on (the trajectories it records), not n_samples etc.:
# sampling more images must not recalibrate.
CALIB_SAMPLING = ("@sampling.steps", "@sampling.skip_type", "@sampling.eta")
CALIBRATION_SETTINGS = ("preset", "seed", "threads", *MODEL, "@checkpoint", "@calibration",
                        *CALIB_SAMPLING)  # fmt: skip


def _fid_stage(samples: str, metrics: str, foreach: str) -> Stage:
    return Stage(
        "fid",
        "--samples {input.samples} --reference-samples {input.reference}"
        " --out {output.metrics} --cache-dir data/fid_cache",
        inputs={"samples": samples, "reference": FP32_SAMPLES},
        outputs={"metrics": metrics},
        settings=("preset", "device", "@fid"),
        foreach=foreach,
        metrics=("metrics",),
    )


STAGES: dict[str, Stage] = {
    "fetch_checkpoint": Stage(
        "fetch", "", outputs={"ckpt": CHECKPOINT}, settings=("preset", "@checkpoint")
    ),
    "calib_data": Stage(
        "calib-data",
        "--out {output.calib}",
        inputs={"ckpt": CHECKPOINT},
        outputs={"calib": CALIBRATION},
        settings=(*CALIBRATION_SETTINGS, "device"),
    ),
    "calibrate": Stage(
        "calibrate",
        "--variant {variant} --out {output.qparams}",  # reads {input.calib} unless fp32
        inputs={"calib": CALIBRATION, "ckpt": CHECKPOINT},
        outputs={"qparams": "data/quant/{variant}.pt"},
        # device: where reconstruction optimises (its floats, hence its codes, differ by device)
        settings=("variants.{variant}", "quant", "device", *CALIBRATION_SETTINGS),
        foreach="variants",
        quantized_only=("calib", "ckpt", "quant", "device", *CALIBRATION_SETTINGS),
    ),
    "sample": Stage(
        "sample",
        "--variant {variant} --qparams {input.qparams} --out {output.samples}",
        inputs={"ckpt": CHECKPOINT, "qparams": "data/quant/{variant}.pt"},
        outputs={"samples": SAMPLES},
        settings=("preset", "seed", "threads", "device", *MODEL, "@sampling"),
        foreach="variants",
    ),
    "damage": Stage(
        "damage",
        "--samples {input.samples} --sigma {sigma} --out {output.samples}",
        inputs={"samples": FP32_SAMPLES},
        outputs={"samples": DAMAGED},
        settings=("seed",),
        foreach="sigmas",
    ),
    # FID of a variant's samples, and of FP32's with noise added: one command, two foreachs.
    "fid": _fid_stage(SAMPLES, "results/metrics/{variant}.json", "variants"),
    "fid_damage": _fid_stage(DAMAGED, "results/metrics/fp32-noise{sigma}.json", "sigmas"),
    "grid": Stage(
        "grid",
        "--samples {input.samples} --out {output.grid}",
        inputs={"samples": SAMPLES},
        outputs={"grid": "results/grids/{variant}.png"},
        foreach="variants",
    ),
    "bench": Stage(
        "bench",
        "--calib {input.calib} --out {output.bench}",
        inputs={"ckpt": CHECKPOINT, "calib": CALIBRATION},
        outputs={"bench": BENCH},
        settings=(
            *("preset", "seed", "threads", "bench", "variants", "quant", *MODEL),
            *("@checkpoint", "@sampling", "@calibration"),
            *("presets.cifar10.model", "presets.cifar10.data", "presets.cifar10.diffusion"),
        ),
        metrics=("bench",),
    ),
    "gather": Stage(
        "gather",
        "--bench {input.bench} --out {output.records} --summary {output.summary}"
        " --plot {output.plot} --plot-data {output.plot_data}",
        inputs={"metrics": Each("results/metrics/{variant}.json", "variants"), "bench": BENCH},
        outputs={
            "records": "results/metrics.json",
            "summary": "results/summary.json",
            "plot": "results/plots/fid_vs_abits.png",
            "plot_data": "results/plots/fid_vs_abits.json",
        },
        settings=("variants",),
        metrics=("summary",),
        plots={
            "plot_data": {
                "template": "scatter",
                "x": "a_bits",
                "y": "fid",
                "title": "FID against activation bits (8-bit weights)",
            },
            "plot": {},
        },  # fmt: skip
    ),
    "report": Stage(
        "report",
        "--records {input.records} --plot {input.plot} --bench {input.bench} --out {output.report}",
        inputs={
            "records": "results/metrics.json",
            "plot": "results/plots/fid_vs_abits.png",
            "damage": Each("results/metrics/fp32-noise{sigma}.json", "sigmas"),
            "bench": BENCH,
            "grids": Each("results/grids/{variant}.png", "variants"),
        },
        outputs={"report": "results/report.md"},
        settings=(
            *("preset", "seed", "threads", "device", "quant", "variants", "damage_check"),
            *("@checkpoint", "@sampling", "@calibration", "@fid"),
        ),
    ),
}
# Snakemake only: it samples in shards (whole batches) and merges them (DVC samples unsharded).
MERGE = Stage("merge", "--shards {input.shards} --out {output.samples}", outputs={})


# --- code deps: the package files a subcommand can import ---------------------------------------


def _module_file(module: str) -> Path | None:
    """``modiff.x.y`` -> its file (a module or a package's __init__.py), None if not the package."""
    parts = module.split(".")
    if parts[0] != "modiff":
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(node: ast.AST, package: str) -> set[str]:
    """Modules named by the imports under ``node`` (absolute, relative and ``from pkg import
    submodule``), in the package or not."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                anchor = package.split(".")[: len(package.split(".")) - n.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in n.names}  # kept below only if a module
    return found


def _data_files(tree: ast.AST, folder: Path) -> set[Path]:
    """Files beside a module that it names in a string (e.g. params.schema.yaml)."""
    beside = {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix != ".py"}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    return {path for name, path in beside.items() if name in strings}


@cache
def _closure(module: str) -> frozenset[Path]:
    """The files of ``module``, of its parent packages and of everything they import, anywhere
    in their code (a function's import may run): a superset of what running it can load."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        files.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent __init__s run first
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else ".".join(parts[:-1])
        todo += sorted(_imported_modules(tree, package))
        files |= _data_files(tree, path.parent)
    return frozenset(files)


def _handler_modules(command: str) -> set[str]:
    """Modules imported by ``modiff <command>``'s handler in cli.py, by the cli.py functions it
    calls (transitively), by ``main`` and at cli.py's top level."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    handler = "cmd_" + command.replace("-", "_")
    if handler not in functions:
        raise ValueError(f"modiff has no subcommand '{command}' (no {handler} in cli.py)")
    top = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
    modules = set().union(*(_imported_modules(n, "modiff") for n in top))
    todo, seen = [handler, "main"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        body = functions[name]
        modules |= _imported_modules(body, "modiff")
        calls = [n.func for n in ast.walk(body) if isinstance(n, ast.Call)]
        todo += [f.id for f in calls if isinstance(f, ast.Name) and f.id in functions]
    return modules


@cache
def code_deps(command: str) -> tuple[str, ...]:
    """The package files ``modiff <command>`` can import or read, relative to the project root."""
    files = {PACKAGE / "cli.py"}.union(*(_closure(m) for m in _handler_modules(command)))
    files |= _closure("modiff")
    return tuple(sorted(str(f.relative_to(ROOT)) for f in files))


# --- dvc.yaml, generated -----------------------------------------------------------------------

DVC_HEADER = """\
# Generated from modiff/pipeline.py by `modiff dvc-yaml`: edit the stage table, not this file
# (tests/test_dvc.py checks that it is up to date). `dvc repro` runs the same stages as
# `snakemake`; settings come from params.yaml (`dvc exp run -S key=value` changes them). One
# difference: DVC samples each variant in one job, Snakemake in shards that it merges,
# bit-identical to the unsharded samples.
"""


def _dvc(text: str) -> str:
    """A table path or setting in DVC's interpolation syntax."""
    return (
        params_key(text)
        .replace("{preset}", "${preset}")
        .replace("{variant}", "${key}")
        .replace("{sigma}", "${item}")
    )


def _dvc_path(value: str | Each) -> str:
    return _dvc(str(Path(value.pattern).parent) if isinstance(value, Each) else value)


def dvc_stage(stage: Stage) -> dict:
    """``stage`` as a dvc.yaml stage (its ``do`` part when it runs per variant or sigma)."""
    raw = {k: v.pattern if isinstance(v, Each) else v for k, v in stage.inputs.items()}
    args = stage.args.format(input=SimpleNamespace(**raw), output=SimpleNamespace(**stage.outputs),
                             variant="{variant}", sigma="{sigma}")  # fmt: skip
    inputs = {k: _dvc_path(v) for k, v in stage.inputs.items()}
    outputs = {k: _dvc(v) for k, v in stage.outputs.items()}
    entry: dict = {"cmd": _dvc(f"modiff {stage.command} {args}".strip())}
    entry["deps"] = list(dict.fromkeys([*inputs.values(), *code_deps(stage.command)]))
    if stage.settings:
        entry["params"] = [_dvc(k) for k in stage.settings]
    for kind, names in (("outs", [k for k in outputs if k not in {*stage.metrics, *stage.plots}]),
                        ("metrics", stage.metrics)):  # fmt: skip
        if names:
            entry[kind] = [outputs[k] for k in names]
    if stage.plots:
        entry["plots"] = [{outputs[k]: props} if props else outputs[k]
                          for k, props in stage.plots.items()]  # fmt: skip
    if stage.foreach:
        return {"foreach": "${" + FOREACH[stage.foreach] + "}", "do": entry}
    return entry


def dvc_yaml() -> str:
    """The text of dvc.yaml."""
    stages = {name: dvc_stage(stage) for name, stage in STAGES.items()}
    body = yaml.safe_dump({"stages": stages}, sort_keys=False, width=100)
    return DVC_HEADER + body
