"""The pipeline, described once: each stage's files, settings and code.

Snakemake's rules (``workflow/rules/*.smk``) read this table; DVC's ``dvc.yaml`` is generated
from it (``modiff generate``; a test checks the committed file is up to date). Each stage is a
module of :mod:`modiff.stages` whose ``run`` function takes the typed settings and the stage's
files; ``modiff <command>`` calls it with one option per declared input and output.

A stage's code is the import closure of its module (:mod:`modiff.codedeps`), fingerprinted on
code that runs: Snakemake tracks the fingerprint as a param of each job, DVC as a param read from
``workflow/code_fingerprints.yaml`` (generated beside dvc.yaml). A docstring or comment edit
reruns nothing; a changed constant reruns exactly the stages that import it.

Paths and settings may hold ``{preset}`` (the selected preset), ``{variant}`` (a name of
params.yaml's ``variants``) and ``{sigma}`` (a noise level of ``damage_check.sigmas``). A
setting ``@section`` is ``presets.<preset>.section``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from modiff.codedeps import fingerprint

# What a stage runs once per: the params.yaml list or mapping, and the wildcard naming one item.
FOREACH_SETTING = {"variants": "variants", "sigmas": "damage_check.sigmas"}
FOREACH_WILDCARD = {"variants": "variant", "sigmas": "sigma"}


@dataclass(frozen=True)
class AllOf:
    """All files of ``pattern`` over a foreach (``variants`` or ``sigmas``): one input of a stage
    that reads them together. The stage gets the pattern and expands it over the settings
    (:func:`modiff.stages.expand`); DVC, whose dep list cannot follow params, depends on the
    folder."""

    pattern: str
    foreach: str


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: ``modiff <command>``, run once or once per ``foreach``.

    ``inputs`` and ``outputs`` name the stage's files; each name is an option of its command
    (``--<name> PATH``) and an argument of its ``run`` function. ``quantized_only`` names the
    inputs and settings the FP32 variant does not use (its calibrate job writes a file saying
    "no quantization"): Snakemake leaves them out of its job; DVC, which cannot, reruns it to the
    same bytes.
    """

    command: str
    outputs: dict[str, str]
    inputs: dict[str, str | AllOf] = field(default_factory=dict)
    settings: tuple[str, ...] = ()
    foreach: str | None = None
    item_argument: bool = False  # run() takes its foreach item (--variant NAME or --sigma S)
    quantized_only: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()  # outputs that are DVC metrics
    plots: dict[str, dict] = field(default_factory=dict)  # outputs that are DVC plots: props

    @property
    def module(self) -> str:
        """The module running this stage (its ``run`` function)."""
        return "modiff.stages." + self.command.replace("-", "_")

    def _used(self, key: str, variant: str | None) -> bool:
        return not (variant == "fp32" and key in self.quantized_only)

    def settings_for(self, variant: str | None = None) -> tuple[str, ...]:
        """The params keys a job reads (for the FP32 variant: fewer, see ``quantized_only``)."""
        return tuple(k for k in self.settings if self._used(k, variant))

    def inputs_for(self, variant: str | None = None) -> dict[str, str | AllOf]:
        return {k: v for k, v in self.inputs.items() if self._used(k, variant)}

    def options(self, variant: str | None = None) -> list[tuple[str, str, str]]:
        """``(option, kind, file name)`` for each file of a job, kind ``input``/``output``; the
        per-item option (``--variant``/``--sigma``) comes first, named by its wildcard."""
        options = []
        if self.item_argument:
            wildcard = FOREACH_WILDCARD[self.foreach]
            options.append((f"--{wildcard}", "wildcard", wildcard))
        options += [(option_name(k), "input", k) for k in self.inputs_for(variant)]
        options += [(option_name(k), "output", k) for k in self.outputs]
        return options


def option_name(name: str) -> str:
    """The command-line option of a stage's file (or run argument) ``name``."""
    return "--" + name.replace("_", "-")


def params_key(setting: str) -> str:
    """A table setting as a params.yaml key: ``@section`` is ``presets.{preset}.section``."""
    return "presets.{preset}." + setting[1:] if setting.startswith("@") else setting


CHECKPOINT = "data/checkpoints/{preset}.ckpt"
CALIBRATION = "data/calibration/{preset}.pt"
QPARAMS = "data/quant/{variant}.pt"
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
        inputs={"samples": samples, "reference": FP32_SAMPLES},
        outputs={"metrics": metrics},
        settings=("preset", "device", "@fid"),
        foreach=foreach,
        metrics=("metrics",),
    )


STAGES: dict[str, Stage] = {
    "fetch_checkpoint": Stage(
        "fetch", outputs={"ckpt": CHECKPOINT}, settings=("preset", "@checkpoint")
    ),  # fmt: skip
    "calib_data": Stage(
        "calib-data",
        inputs={"ckpt": CHECKPOINT},
        outputs={"calib": CALIBRATION},
        settings=(*CALIBRATION_SETTINGS, "device"),
    ),
    "calibrate": Stage(
        "calibrate",
        inputs={"calib": CALIBRATION, "ckpt": CHECKPOINT},
        outputs={"qparams": QPARAMS},
        # device: where reconstruction optimises (its floats, hence its codes, differ by device)
        settings=("variants.{variant}", "quant", "device", *CALIBRATION_SETTINGS),
        foreach="variants",
        item_argument=True,
        quantized_only=("calib", "ckpt", "quant", "device", *CALIBRATION_SETTINGS),
    ),
    "sample": Stage(
        "sample",
        inputs={"ckpt": CHECKPOINT, "qparams": QPARAMS},
        outputs={"samples": SAMPLES},
        settings=("preset", "seed", "threads", "device", *MODEL, "@sampling"),
        foreach="variants",
        item_argument=True,
    ),
    "damage": Stage(
        "damage",
        inputs={"samples": FP32_SAMPLES},
        outputs={"damaged": DAMAGED},
        settings=("seed",),
        foreach="sigmas",
        item_argument=True,
    ),
    # FID of a variant's samples, and of FP32's with noise added: one command, two foreachs.
    "fid": _fid_stage(SAMPLES, "results/metrics/{variant}.json", "variants"),
    "fid_damage": _fid_stage(DAMAGED, "results/metrics/fp32-noise{sigma}.json", "sigmas"),
    "grid": Stage(
        "grid",
        inputs={"samples": SAMPLES},
        outputs={"grid": "results/grids/{variant}.png"},
        foreach="variants",
    ),
    "bench": Stage(
        "bench",
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
        inputs={"metrics": AllOf("results/metrics/{variant}.json", "variants"), "bench": BENCH},
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
        inputs={
            "records": "results/metrics.json",
            "plot": "results/plots/fid_vs_abits.png",
            "damage": AllOf("results/metrics/fp32-noise{sigma}.json", "sigmas"),
            "bench": BENCH,
            "grids": AllOf("results/grids/{variant}.png", "variants"),
        },
        outputs={"report": "results/report.md"},
        settings=(
            *("preset", "seed", "threads", "device", "quant", "variants", "damage_check"),
            *("@checkpoint", "@sampling", "@calibration", "@fid"),
        ),
    ),
}
# Snakemake only: it samples in shards (whole batches) and merges them (DVC samples unsharded).
MERGE = Stage("merge", inputs={"shards": "results/samples/{variant}/shard-{shard}.npz"},
              outputs={"samples": SAMPLES})  # fmt: skip
COMMANDS = {stage.command: stage for stage in (*STAGES.values(), MERGE)}


def code_fingerprint(stage: Stage) -> str:
    """The fingerprint of the code ``stage`` runs (:func:`modiff.codedeps.fingerprint`)."""
    return fingerprint(stage.module)


# --- dvc.yaml and its code fingerprints, generated ---------------------------------------------

CODE_FINGERPRINTS = "workflow/code_fingerprints.yaml"
DVC_HEADER = """\
# Generated from modiff/pipeline.py by `modiff generate`: edit the stage table, not this file
# (tests/test_dvc.py checks that it is up to date). `dvc repro` runs the same stages as
# `snakemake`; settings come from params.yaml (`dvc exp run -S key=value` changes them), each
# stage's code fingerprint from workflow/code_fingerprints.yaml. One difference: DVC samples
# each variant in one job, Snakemake in shards that it merges, bit-identical to the unsharded
# samples.
"""
FINGERPRINTS_HEADER = """\
# Generated by `modiff generate` (tests/test_dvc.py checks it is current): the fingerprint of the
# code each stage runs (modiff/codedeps.py), which dvc.yaml's stages depend on as params.
"""


def _dvc(text: str) -> str:
    """A table path or setting in DVC's interpolation syntax."""
    return (
        params_key(text)
        .replace("{preset}", "${preset}")
        .replace("{variant}", "${key}")
        .replace("{sigma}", "${item}")
    )


def _dvc_path(value: str | AllOf) -> str:
    return _dvc(str(Path(value.pattern).parent) if isinstance(value, AllOf) else value)


def dvc_stage(name: str, stage: Stage) -> dict:
    """``stage`` as a dvc.yaml stage (its ``do`` part when it runs per variant or sigma)."""
    words = ["modiff", stage.command]
    for option, kind, key in stage.options():
        if kind == "wildcard":
            words += [option, "{" + key + "}"]
        elif kind == "input" and isinstance(stage.inputs[key], AllOf):
            words += [option, f"'{stage.inputs[key].pattern}'"]  # expanded by the stage
        else:
            words += [option, (stage.inputs if kind == "input" else stage.outputs)[key]]
    inputs = {k: _dvc_path(v) for k, v in stage.inputs.items()}
    outputs = {k: _dvc(v) for k, v in stage.outputs.items()}
    # AllOf patterns keep their braces: the stage expands them, DVC must not.
    command = " ".join(w if w.startswith("'") else _dvc(w) for w in words)
    entry: dict = {"cmd": command}
    if inputs:
        entry["deps"] = list(dict.fromkeys(inputs.values()))
    entry["params"] = [_dvc(k) for k in stage.settings] + [{CODE_FINGERPRINTS: [name]}]
    for kind, names in (("outs", [k for k in outputs if k not in {*stage.metrics, *stage.plots}]),
                        ("metrics", stage.metrics)):  # fmt: skip
        if names:
            entry[kind] = [outputs[k] for k in names]
    if stage.plots:
        entry["plots"] = [{outputs[k]: props} if props else outputs[k]
                          for k, props in stage.plots.items()]  # fmt: skip
    if stage.foreach:
        return {"foreach": "${" + FOREACH_SETTING[stage.foreach] + "}", "do": entry}
    return entry


def dvc_yaml() -> str:
    """The text of dvc.yaml."""
    stages = {name: dvc_stage(name, stage) for name, stage in STAGES.items()}
    body = yaml.safe_dump({"stages": stages}, sort_keys=False, width=100)
    return DVC_HEADER + body


def code_fingerprints_yaml() -> str:
    """The text of workflow/code_fingerprints.yaml."""
    table = {name: code_fingerprint(stage) for name, stage in STAGES.items()}
    return FINGERPRINTS_HEADER + yaml.safe_dump(table, sort_keys=False)


def generated_files() -> dict[str, str]:
    """Every file generated from the code, by path: dvc.yaml, its fingerprints, the schema."""
    import json

    from modiff.config import json_schema

    return {
        "dvc.yaml": dvc_yaml(),
        CODE_FINGERPRINTS: code_fingerprints_yaml(),
        "params.schema.json": json.dumps(json_schema(), indent=2) + "\n",
    }
