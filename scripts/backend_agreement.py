"""Do two backends give the same images? Samples each quantized variant of a finished run again on
another backend (same qparams, same x_T) and compares with the run's samples: per-image PSNR
between the two and both FIDs.

    python scripts/backend_agreement.py --backend native [--variants a b ...]

Run in a project whose pipeline has finished (data/checkpoints, data/quant, results/samples);
writes results/backend_agreement.json and prints a table. Target (issue 25): median PSNR >= 40 dB
and FIDs within 2% for every default variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from modiff.choices import Backend, allowed
from modiff.config import load_params
from modiff.io import load_images
from modiff.metrics import psnr
from modiff.pipeline import CHECKPOINT, FP32_SAMPLES, QPARAMS, SAMPLES
from modiff.records import SampleMeta


def _modiff(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "modiff.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="native", choices=allowed(Backend),
                        help="the backend to compare with")  # fmt: skip
    parser.add_argument("--variants", nargs="*", help="default: every quantized variant")
    parser.add_argument("--out", default="results/backend_agreement.json")
    args = parser.parse_args()
    params = load_params("params.yaml")
    names = args.variants or list(params.quantized_variants)
    checkpoint = CHECKPOINT.format(preset=params.preset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ran = Path(SAMPLES.format(variant=name))
            other = Path(tmp) / f"{name}.npz"
            _modiff("sample", "--variant", name, "--ckpt", checkpoint,
                    "--qparams", QPARAMS.format(variant=name), "--backend", args.backend,
                    "--samples", str(other))  # fmt: skip
            fids = {}
            for label, path in (("run", ran), ("other", other)):
                metrics = Path(tmp) / f"{name}-{label}.json"
                _modiff("fid", "--samples", str(path), "--reference", FP32_SAMPLES,
                        "--metrics", str(metrics))  # fmt: skip
                fids[label] = json.loads(metrics.read_text())["fid"]
            images_run, meta_run = load_images(ran)
            images_other, meta_other = load_images(other)
            meta_run, meta_other = SampleMeta.from_json(meta_run), SampleMeta.from_json(meta_other)
            values = np.minimum(psnr(images_run, images_other), 100.0)  # identical: inf
            rows.append({
                "variant": name,
                "backends": [meta_run.quant["backend"], meta_other.quant["backend"]],
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
