"""Do two backends give the same images? Samples each quantized variant of a finished run again on
another backend (same qparams, same x_T) and compares with the run's samples: per-image PSNR
between the two and both FIDs.

    python scripts/backend_agreement.py --backend native [--variants a b ...]

Run in a project whose pipeline has finished (results/samples, data/quant); writes
results/backend_agreement.json and prints a table. Target (issue 25): median PSNR >= 40 dB and
FIDs within 2% for every default variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from modiff.config import load_params
from modiff.io import load_images
from modiff.metrics import psnr


def _modiff(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "modiff.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="native", help="the backend to compare with")
    parser.add_argument("--variants", nargs="*", help="default: every quantized variant")
    parser.add_argument("--out", default="results/backend_agreement.json")
    args = parser.parse_args()
    params = load_params("params.yaml")
    names = args.variants or [n for n, v in params["variants"].items() if v["method"] != "fp32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ran = Path(f"results/samples/{name}.npz")
            other = Path(tmp) / f"{name}.npz"
            _modiff("sample", "--variant", name, "--qparams", f"data/quant/{name}.pt",
                    "--backend", args.backend, "--out", str(other))  # fmt: skip
            fids = {}
            for label, path in (("run", ran), ("other", other)):
                metrics = Path(tmp) / f"{name}-{label}.json"
                _modiff("fid", "--samples", str(path), "--out", str(metrics))
                fids[label] = json.loads(metrics.read_text())["fid"]
            images_run, meta_run = load_images(ran)
            images_other, meta_other = load_images(other)
            values = np.minimum(psnr(images_run, images_other), 100.0)  # identical: inf
            rows.append({
                "variant": name,
                "backends": [meta_run["quant"]["backend"], meta_other["quant"]["backend"]],
                "median_psnr_db": round(float(np.median(values)), 2),
                "identical_images": int(np.sum(values >= 100.0)),
                "n": len(values),
                "fid": [fids["run"], fids["other"]],
                "fid_rel_diff": round(abs(fids["run"] - fids["other"]) / fids["other"], 4),
            })  # fmt: skip
            print(json.dumps(rows[-1]))
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
