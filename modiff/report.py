"""results/report.md: what users open first."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from modiff.choices import RECONSTRUCTION_NAMES
from modiff.config import Params, Variant
from modiff.io import atomic_output
from modiff.records import VariantRecord

SCALES = {"static": "static", "dynamic": "dynamic per-tensor (LTQ)",
          "lcq": "dynamic per-sample (LCQ)"}  # fmt: skip


def method_label(record: VariantRecord) -> str:
    """The method of a record by what it ran: Q-Diffusion only with its reconstruction."""
    label = RECONSTRUCTION_NAMES[record.reconstruction or "none"].label
    if record.learn_act_scales:
        label += ", learned step sizes"
    return label + (" + MoDiff" if record.method == "modiff" else "")


def _scale_kind(record: VariantRecord) -> str:
    return Variant.from_name(record.variant).scale_kind  # the name says it


def row_label(record: VariantRecord) -> str:
    """A row of the paper-shaped table: the method and its activation scales."""
    return f"{method_label(record)}, {SCALES[_scale_kind(record)]} scales"


def _row_order(record: VariantRecord) -> tuple:
    """The paper's row order: static, then dynamic scales; within each, plain rounding before
    reconstruction, each without and then with MoDiff."""
    return (list(SCALES).index(_scale_kind(record)), record.reconstruction != "none",
            bool(record.learn_act_scales), record.method == "modiff")  # fmt: skip


def _rel(path: str | Path, start: Path) -> str:
    return os.path.relpath(Path(path), start)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def paper_table(records: list[VariantRecord], key: str, digits: int) -> list[str]:
    """Rows: method and scales; columns: W/A bits, W8 before W4 and activation bits falling (the
    layout of the paper's CIFAR-10 table)."""
    quantized = [r for r in records if r.method != "fp32"]
    columns = sorted({(r.w_bits, r.a_bits) for r in quantized}, key=lambda b: (-b[0], -b[1]))
    cells: dict[str, dict[tuple[int, int], Any]] = {}
    for r in sorted(quantized, key=_row_order):
        cells.setdefault(row_label(r), {})[(r.w_bits, r.a_bits)] = getattr(r, key)
    lines = ["| method | " + " | ".join(f"W{w}A{a}" for w, a in columns) + " |",
             "|---|" + "---|" * len(columns)]  # fmt: skip
    fp32 = next((r for r in records if r.method == "fp32"), None)
    if fp32 and getattr(fp32, key) is not None:
        padding = " |" * (len(columns) - 1)
        lines.append(f"| FP32 | {_fmt(getattr(fp32, key), digits)} (all columns) |{padding}")
    for label, row in cells.items():
        values = [_fmt(row[c], digits) if c in row else "" for c in columns]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return lines


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| model | weights | variant | int8 scheme | batch | ms/step | img/s | x FP32 "
        "| x fastest FP32 | sampling MB | peak RSS MB | cache MB/img |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['variant']} | {format_schemes(r.get('schemes'))}"
            f" | {r['batch']} | {r['step_ms']:.2f} | {r['images_per_s']:.1f}"
            f" | {r['speedup_vs_fp32']:.2f} | {_fmt(r.get('speedup_vs_fastest_fp32'), 2)}"
            f" | {r.get('sampling_mem_mb', '-')}"
            f" | {r.get('peak_rss_mb', '-')} | {r.get('cache_mb_per_image', '-')} |"
        )
    return "\n".join(lines)


def format_schemes(schemes: dict[str, int] | None) -> str:
    """Native layer parts per kernel scheme, e.g. ``split 67, direct 58``; ``-`` for none."""
    if not schemes:
        return "-"
    return ", ".join(f"{name} {count}" for name, count in sorted(schemes.items(), reverse=True))


def _kernels(record: VariantRecord) -> list[dict[str, Any]]:
    """A record's kernel records: one, or one per CPU type its shards ran on."""
    kernels = record.kernels or []
    return kernels if isinstance(kernels, list) else [kernels]


def _scheme_cell(record: VariantRecord) -> str:
    cells = []
    for k in _kernels(record):
        if k and k.get("schemes"):
            cells.append(f"{format_schemes(k['schemes'])} ({k['cpu_isa']})")
    return "; ".join(cells) or "-"


def variant_table(records: list[VariantRecord]) -> list[str]:
    lines = [
        "| variant | backend | int8 scheme (CPU) | N | steps | FID | KID "
        "| PSNR vs FP32 (dB, median) | ms/step | x FP32 | cache MB/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        backend = r.backend if not r.device else f"{r.backend} on {r.device}"
        lines.append(
            f"| {r.variant} | {backend} | {_scheme_cell(r)} | {r.n_samples} | {r.steps} "
            f"| {_fmt(r.fid, 3)} | {_fmt(r.kid, 5)} | {_fmt(r.psnr_vs_fp32, 1)} "
            f"| {_fmt(r.step_ms, 2)} | {_fmt(r.speedup_vs_fp32, 2)} "
            f"| {_fmt(r.cache_mb_per_image, 2)} |"
        )
    return lines


def write_report(
    params: Params,
    records_file: str,
    plot_file: str,
    damage_files: list[str],
    bench_file: str,
    grid_files: list[str],
    out: str | Path,
) -> None:
    """Render settings, the paper-shaped tables, speed, plots and sample grids as Markdown."""
    out = Path(out)
    records = [VariantRecord.from_json(r) for r in json.loads(Path(records_file).read_text())]
    bench = json.loads(Path(bench_file).read_text())
    damage = [json.loads(Path(f).read_text()) for f in damage_files]
    env = bench["environment"]
    preset = params.selected
    sampling, checkpoint, fid = preset.sampling, preset.checkpoint, preset.fid
    digest = ("md5", checkpoint.md5) if checkpoint.md5 else ("sha256", checkpoint.sha256)
    n = sorted({r.n_samples for r in records})
    quant = params.quant
    lines = [
        f"# modiff report: preset `{params.preset}`",
        "",
        "## Settings and environment",
        "",
        f"- checkpoint: `{checkpoint.source}` ({digest[0]} `{digest[1]}`)",
        f"- sampler: DDIM, {sampling.steps} {sampling.skip_type} steps, eta {sampling.eta}, "
        f"batch {sampling.batch_size}, seed {params.seed}, {sampling.shards} shards",
        f"- quantization: backend `{quant.backend}`, MoDiff warm-up `{quant.warmup}`; "
        "Q-Diffusion calibration "
        f"({preset.calibration.cali_st} steps x {preset.calibration.cali_n} "
        "trajectories)",
        *_auto_backend_line(quant.backend),
        f"- torch {env['torch']}, CPU {env['cpu']}, {params.threads} threads, "
        f"device {params.device}, quantized engine {env['quantized_engine']}",
        f"- int8 kernels: {_isa_line(env)}",
        f"- FID: N = {', '.join(map(str, n))} samples against `{fid.reference}` with "
        f"`{fid.feature_extractor}` features. FID at small N is biased upwards: compare only "
        "figures with equal N and the same reference set; none of these are comparable to "
        "50,000-sample figures such as the paper's.",
        "",
        "## Quality (the paper's table shape)",
        "",
        f"FID (lower is better), N = {', '.join(map(str, n))}:",
        "",
        *paper_table(records, "fid", 3),
        "",
        "KID:",
        "",
        *paper_table(records, "kid", 5),
        "",
        "PSNR against the FP32 sample from the same x_T (dB, median over images):",
        "",
        *paper_table(records, "psnr_vs_fp32", 1),
        "",
        f"![FID against activation bits]({_rel(plot_file, out.parent)})",
        "",
        "### Every variant",
        "",
        f"Speed is per DDIM step on the preset model at batch {_bench_batch(records)}, "
        "against FP32 timed in the same run.",
        "",
        *variant_table(records),
        "",
    ]
    if damage:
        fp32 = next(r for r in records if r.method == "fp32")
        lines += [
            "### Can the metrics see damage?",
            "",
            "FP32 samples with Gaussian noise added (sigma on the [-1, 1] scale):",
            "",
            "| samples | FID | KID | PSNR vs FP32 (dB) |",
            "|---|---|---|---|",
            f"| FP32 | {fp32.fid:.3f} | {fp32.kid:.5f} | - |",
        ]
        for d in damage:
            lines.append(f"| FP32 + noise sigma {d['noise_sigma']:g} | {d['fid']:.3f} "
                         f"| {d['kid']:.5f} | {_fmt(d.get('psnr_vs_fp32'), 1)} |")  # fmt: skip
        lines.append("")
    cifar = [r for r in bench["rows"] if r["model"] == "cifar10"]
    if cifar:
        lines += [
            "## Speed on the CIFAR-10 UNet (timing only: random weights)",
            "",
            "Per DDIM step, median of paired repetitions; x FP32 is the median ratio against torch "
            "FP32 in the same repetition, x fastest FP32 the ratio of medians against the fastest "
            "FP32 engine of the run; memory is measured in a fresh process. CPU ISA "
            f"{env.get('cpu_isa', '?')}, int8 kernels {env.get('int8_kernels', '?')}.",
            "",
            format_table(cifar),
            "",
            *peer_lines(bench),
        ]
    lines += accuracy_lines(bench, params.preset)
    lines += ["## Samples", "", "Same x_T per image index in every variant.", ""]
    for g in grid_files:
        lines += [f"**{Path(g).stem}**", "", f"![{Path(g).stem}]({_rel(g, out.parent)})", ""]
    lines += ["## Raw data", ""]
    for f in [records_file, *damage_files, bench_file]:
        lines.append(f"- [{f}]({_rel(f, out.parent)})")
    with atomic_output(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _auto_backend_line(backend: str) -> list[str]:
    if backend != "auto":
        return []
    return ["- backend `auto`: static-scale variants run on `openvino` (the model compiled as one "
            "integer graph) on a CPU with AVX2, dynamic-scale (and LCQ) variants on `native`, "
            "since OpenVINO runs a quantizer in integer only with constant ranges; the variant "
            "table names each variant's backend"]  # fmt: skip


def peer_lines(bench: dict[str, Any]) -> list[str]:
    """Which other engines ran beside modiff, and why the others did not."""
    peers = bench.get("peers") or {"requested": [], "skipped": {}}
    ran = [e for e in peers["requested"] if e not in peers["skipped"]]
    lines = []
    if ran:
        lines.append(f"Other engines in the same paired runs: {', '.join(ran)} (`modiff.peers`).")
    for engine, reason in peers["skipped"].items():
        lines.append(f"- **{engine} did not run**: {reason}.")
    if not peers["requested"]:
        lines.append("No other engines ran (params.yaml `bench.peers` is empty).")
    return [*lines, ""] if lines else []


def accuracy_lines(bench: dict[str, Any], preset: str) -> list[str]:
    """The INT8 accuracy table: eps error against FP32 on the preset model's inputs."""
    rows = bench.get("accuracy") or []
    if not rows:
        return []
    lines = [
        f"## INT8 accuracy on the {preset} model",
        "",
        f"eps error against FP32 on {rows[0]['n_inputs']} calibration inputs (x_t, t) from FP32 "
        "trajectories; every method calibrated on the same inputs. A native variant equals its "
        "simulated twin up to float rounding on every CPU; engines whose int8 kernels saturate "
        "(no VNNI) show it here.",
        "",
        "| variant | rel. rms error | max abs error |",
        "|---|---|---|",
    ]
    for r in rows:
        if "error" in r:  # the engine failed on this machine: say so in the row
            lines.append(f"| {r['variant']} | failed: {r['error']} | - |")
            continue
        lines.append(f"| {r['variant']} | {r['eps_rel_rms_vs_fp32']:.5f} "
                     f"| {r['eps_max_abs_vs_fp32']:.4f} |")  # fmt: skip
    return [*lines, ""]


def _isa_line(env: dict[str, Any]) -> str:
    """The benchmark machine's ISA and what its int8 kernels do (the split scheme's reason)."""
    isa = env.get("cpu_isa", "unknown ISA")
    if env.get("onednn_max_cpu_isa"):
        isa += f", oneDNN capped to {env['onednn_max_cpu_isa']}"
    kind = env.get("int8_kernels", "unknown")
    line = f"{kind} on this CPU ({isa})"
    if kind.startswith("saturating"):
        line += (
            "; layers whose 8-bit codes and 8-bit weights could overflow int16 pairs run the exact "
            "*split* scheme (two 7-bit halves of every code, twice the integer work), the others "
            "one *direct* call: same bits and results as a VNNI CPU"
        )
    return line


def _bench_batch(records: list[VariantRecord]) -> str:
    batches = {r.bench_batch for r in records if r.bench_batch}
    return ", ".join(map(str, sorted(batches))) or "-"
