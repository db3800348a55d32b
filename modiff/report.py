"""results/report.md: what users open first."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from modiff.bench import format_table
from modiff.io import atomic_output


def _rel(path: str | Path, start: Path) -> str:
    return os.path.relpath(Path(path), start)


def write_report(
    params: dict[str, Any],
    preset: dict[str, Any],
    metrics_files: list[str],
    bench_file: str,
    grid_files: list[str],
    out: str | Path,
) -> None:
    """Render the settings, metrics, benchmark and sample grids as Markdown."""
    out = Path(out)
    bench = json.loads(Path(bench_file).read_text())
    metrics = [json.loads(Path(f).read_text()) | {"file": f} for f in metrics_files]
    env = bench["environment"]
    s = preset["sampling"]
    ck = preset["checkpoint"]
    lines = [
        f"# modiff report: preset `{preset['name']}`",
        "",
        "## Settings and environment",
        "",
        f"- checkpoint: `{ck['source']}` ({'md5' if 'md5' in ck else 'sha256'} "
        f"`{ck.get('md5') or ck.get('sha256')}`)",
        f"- sampler: DDIM, {s['steps']} {s['skip_type']} steps, eta {s['eta']}, "
        f"batch {s['batch_size']}, seed {params['seed']}",
        f"- torch {env['torch']}, CPU {env['cpu']}, {params['threads']} threads, "
        f"device {params['device']}, quantized engine {env['quantized_engine']}",
        "",
        "## Quality",
        "",
        "| variant | N | steps | FID | KID | reference |",
        "|---|---|---|---|---|---|",
    ]
    for m in metrics:
        name = Path(m["file"]).stem
        lines.append(
            f"| {name} | {m['n_samples']} | {m.get('steps')} | {m['fid']:.3f} | "
            f"{m['kid']:.5f} | {m['reference']} ({m['feature_extractor']}) |"
        )
    lines += [
        "",
        "FID at small N is biased upwards: compare only figures with equal N and the same "
        "reference set; none of these are comparable to 50k-sample figures.",
        "",
    ]
    for m in metrics:
        if "class_histogram" in m:
            lines.append(
                f"Class histogram of `{Path(m['file']).stem}` by the digits classifier "
                f"(0..9): {m['class_histogram']}"
            )
    lines += ["", "## Speed (per DDIM step)", "", format_table(bench["rows"]), ""]
    lines += ["## Samples", ""]
    for g in grid_files:
        lines.append(f"![{Path(g).stem}]({_rel(g, out.parent)})")
    lines += ["", "## Raw data", ""]
    for f in [*metrics_files, bench_file]:
        lines.append(f"- [{f}]({_rel(f, out.parent)})")
    with atomic_output(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
