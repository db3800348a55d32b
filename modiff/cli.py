"""The ``modiff`` command: one subcommand per pipeline stage.

Settings come from params.yaml (``--params``) with ``-S dotted.key=value`` overrides; paths of
inputs and outputs are arguments. Everything is validated before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("modiff")


# --- shared pieces -----------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validated params and the selected preset config."""
    from modiff.config import load_params, preset_config

    overrides = list(args.set or [])
    if getattr(args, "preset", None):
        overrides.append(f"preset={args.preset}")
    params = load_params(args.params, overrides)
    return params, preset_config(params)


def _checkpoint_file(preset: dict[str, Any], checkpoint: str | None) -> Path:
    """``checkpoint`` (a file of the user's), or else the preset's fetched checkpoint, verified
    against params.yaml's digest."""
    from modiff.fetch import verified_checkpoint

    return Path(checkpoint) if checkpoint else verified_checkpoint(preset)


def _load_model(preset: dict[str, Any], checkpoint: str | None, device: Any):
    """The preset's model with its checkpoint (see :func:`_checkpoint_file`), in eval mode."""
    from modiff.checkpoint import load_into
    from modiff.models import build_model

    model = load_into(build_model(preset), _checkpoint_file(preset, checkpoint))
    return model.eval().to(device)


def _write_metrics(data: dict[str, Any], dest: str | None) -> None:
    import json

    from modiff.io import write_json

    if dest:
        write_json(data, dest)
    print(json.dumps(data, indent=2))


# --- subcommands -------------------------------------------------------------------------------


def cmd_fetch(args: argparse.Namespace) -> None:
    """Fetch the preset's checkpoint (or --url) and verify its digest."""
    from modiff.fetch import fetch

    if args.url:
        if not (args.out and (args.md5 or args.sha256)):
            raise SystemExit("--url needs --out and --md5 or --sha256")
        fetch(args.url, args.out, md5=args.md5, sha256=args.sha256, timeout=args.timeout)
        return
    from modiff.config import checkpoint_path

    _, preset = _settings(args)
    ck = preset["checkpoint"]
    dest = args.out or checkpoint_path(preset["name"])
    fetch(ck["source"], dest, md5=ck.get("md5"), sha256=ck.get("sha256"), timeout=args.timeout)
    log.info("checkpoint of preset %s ready at %s", preset["name"], dest)


def cmd_train(args: argparse.Namespace) -> None:
    """Train the digits preset's diffusion model (reproducible for its seed and threads)."""
    from modiff.fetch import file_digest
    from modiff.train import train_diffusion

    params, preset = _settings(args)
    if "training" not in preset:
        raise SystemExit(f"preset {preset['name']} has no 'training' section: nothing to train")
    _configure_process(params)
    _, summary = train_diffusion(preset, args.out)
    summary["sha256"] = file_digest(args.out, "sha256")
    _write_metrics(summary, args.summary)
    log.info("set presets.%s.checkpoint.sha256 to %s", preset["name"], summary["sha256"])


def cmd_train_classifier(args: argparse.Namespace) -> None:
    """Train the digits classifier used as FID feature extractor."""
    from modiff.classifier import train_classifier

    _, metrics = train_classifier(seed=args.seed, out=Path(args.out))
    print(metrics)


def cmd_sample(args: argparse.Namespace) -> None:
    """Sample images with DDIM; saves uint8 images (N, H, W, C) and metadata as .npz."""
    from modiff.config import shard_range
    from modiff.diffusion import sample_images
    from modiff.io import save_images
    from modiff.quant.layers import kernel_record
    from modiff.runtime import resolve_execution

    params, preset = _settings(args)
    s = preset["sampling"]
    if args.shard is not None:
        if args.n or args.start:
            raise ValueError("--shard picks the images itself; drop --n/--start")
        indices = shard_range(s, args.shard)
    else:
        indices = range(args.start, args.start + (args.n or s["n_samples"]))
    _configure_process(params)
    backend = None
    if args.qparams:  # read and checked first: a bad file fails before the model is loaded
        from modiff.quant import QuantConfig
        from modiff.quant.api import read_quant_params

        saved = read_quant_params(args.qparams)
        made_for = saved.get("meta", {}).get("variant") or args.variant  # None: flags, no grid
        if made_for != args.variant:
            raise ValueError(
                f"{args.qparams} holds variant {made_for}, not --variant {args.variant}: "
                f"pass data/quant/{args.variant}.pt"
            )
        if saved["config"] is not None:
            backend = args.backend or QuantConfig.from_dict(saved["config"]).backend
    elif args.variant != "fp32":
        raise ValueError("a quantized --variant needs --qparams (from `modiff calibrate`)")
    execution = resolve_execution(params["device"], backend)
    device = execution.device
    model = _load_model(preset, args.checkpoint, device)
    qconfig = None
    if args.qparams:
        from modiff.quant.api import load_quantized

        model, qconfig = load_quantized(model.cpu(), args.qparams, backend=execution.backend)
        model = model.to(device)
    log.info("sampling %s: images %d..%d", args.variant, indices.start, indices.stop)
    t0 = time.perf_counter()
    images = sample_images(
        model,
        preset,
        indices=indices,
        batch_size=s["batch_size"],
        steps=s["steps"],
        skip_type=s["skip_type"],
        eta=s["eta"],
        seed=params["seed"],
        device=device,
    )
    meta = {
        "variant": args.variant,
        "preset": preset["name"],
        "method": "fp32" if qconfig is None else qconfig.method,
        "quant": None if qconfig is None else qconfig.to_dict(),
        "indices": [indices.start, indices.stop],
        "seed": params["seed"],
        "sampling": {k: v for k, v in s.items() if k != "shards"},
        "device": str(device),
        "threads": params["threads"],
        "kernels": kernel_record(model),  # CPU ISA; native: exact or saturating, schemes
    }  # no run time: equal images make an equal file (DVC and Snakemake compare checksums)
    if args.shard is not None:
        meta["shard"] = [args.shard, s["shards"]]
    save_images(args.out, images, **meta)
    log.info("wrote %d images to %s in %.1f s", len(images), args.out, time.perf_counter() - t0)


def cmd_merge(args: argparse.Namespace) -> None:
    """Merge sample shards (whole batches each) into one samples file."""
    from modiff.io import save_images
    from modiff.results import merge_shards

    images, meta = merge_shards(args.shards)
    save_images(args.out, images, **meta)
    log.info("merged %d shards, %d images -> %s", len(args.shards), len(images), args.out)


def cmd_damage(args: argparse.Namespace) -> None:
    """Add Gaussian noise to samples (the check that the metrics can see damage)."""
    from modiff.io import load_images, save_images
    from modiff.results import add_noise

    params, _ = _settings(args)
    images, meta = load_images(args.samples)
    variant = f"{meta.get('variant', 'fp32')}-noise{args.sigma:g}"
    meta.update(variant=variant, noise_sigma=args.sigma)
    save_images(args.out, add_noise(images, args.sigma, params["seed"]), **meta)


def cmd_calib_data(args: argparse.Namespace) -> None:
    """Time-step-aware calibration inputs (with previous-step inputs) from FP32 sampling."""
    from modiff.calibration import calibration_meta, collect_calibration, save_calibration
    from modiff.runtime import resolve_execution

    params, preset = _settings(args)
    c = preset["calibration"]
    _configure_process(params)
    device = resolve_execution(params["device"]).device
    model = _load_model(preset, args.checkpoint, device)
    data = collect_calibration(
        model, preset, cali_st=c["cali_st"], cali_n=c["cali_n"], seed=params["seed"],
        batch_size=c["batch_size"], device=device,
    )  # fmt: skip
    meta = calibration_meta(params, preset, _checkpoint_file(preset, args.checkpoint))
    save_calibration(data, meta, args.out)
    log.info("wrote %d calibration inputs to %s", len(data["xs"]), args.out)


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Quantize the preset model (scale search on calibration data); save its parameters."""
    from modiff.calibration import calibration_meta, load_calibration
    from modiff.quant import QuantConfig, quantize_
    from modiff.quant.api import save_quant_params, target_layers, weights_fingerprint
    from modiff.runtime import resolve_device

    params, preset = _settings(args)
    _configure_process(params)
    if args.variant:
        from modiff.config import find_variant

        variant = find_variant(params, args.variant)
        if variant["method"] == "fp32":  # the reference: nothing to calibrate, a file saying so
            save_quant_params(None, None, "", args.out, {"variant": args.variant})
            return
        config = QuantConfig.from_variant(variant, params["quant"])
    else:
        config = QuantConfig(
            w_bits=args.w_bits, a_bits=args.a_bits, a_scale=args.a_scale, backend=args.backend,
            a_granularity=args.a_granularity, modulation=args.modulation, warmup=args.warmup,
            reconstruction=args.reconstruction, reconstruction_iters=args.reconstruction_iters,
            learn_act_scales=args.learn_act_scales,
        )  # fmt: skip
    from modiff.config import calibration_path

    checkpoint = _checkpoint_file(preset, args.checkpoint)  # verified once, read twice
    meta = calibration_meta(params, preset, checkpoint)
    calib = args.calib or calibration_path(preset["name"])
    calibration = load_calibration(calib, meta) if config.needs_calibration else None
    model = _load_model(preset, str(checkpoint), "cpu")
    fingerprint = weights_fingerprint(model, list(target_layers(model, config)))
    # Reconstruction's optimisation runs on params' device (CUDA when there); the scale search
    # and the layers stay on the CPU, where the native kernels are.
    device = resolve_device(params["device"]) if config.learns else "cpu"
    t0 = time.perf_counter()
    quantize_(model, config, calibration, seed=params["seed"], device=device)
    meta.update(recipe=config.recipe, **({"variant": args.variant} if args.variant else {}))
    save_quant_params(model, config, fingerprint, args.out, meta)  # no run time, as for samples
    log.info("calibrated W%dA%d (%s) in %.0f s -> %s", config.w_bits, config.a_bits,
             config.a_scale, time.perf_counter() - t0, args.out)  # fmt: skip


def cmd_fid(args: argparse.Namespace) -> None:
    """FID and KID of a samples file against the preset's reference set."""
    from modiff.io import load_images
    from modiff.metrics import compute_fid
    from modiff.results import fid_record
    from modiff.runtime import resolve_execution

    params, preset = _settings(args)
    images, meta = load_images(args.samples)
    reference = None
    if args.reference_samples:  # checked before the features are computed
        reference, ref_meta = load_images(args.reference_samples)
        if ref_meta.get("indices") != meta.get("indices") or ref_meta["seed"] != meta["seed"]:
            raise ValueError(
                f"{args.reference_samples} holds other images (indices/seed) than {args.samples}: "
                "PSNR compares samples from the same x_T"
            )
    scores = compute_fid(
        images,
        preset=preset["name"],
        fid_config=preset["fid"],
        cache_dir=args.cache_dir,
        device=resolve_execution(params["device"]).device.type,
    )
    if reference is not None and ref_meta.get("variant") != meta.get("variant"):
        from modiff.metrics import psnr

        record = fid_record(scores, args.samples, meta, psnr(images, reference))
    else:  # no reference, or FP32 itself
        record = fid_record(scores, args.samples, meta)
    if preset["fid"]["feature_extractor"] == "digits-classifier":
        from modiff.classifier import class_histogram, load_classifier

        classifier = load_classifier(preset["fid"]["classifier"])
        record["class_histogram"] = class_histogram(classifier, images)
    _write_metrics(record, args.out)


def cmd_grid(args: argparse.Namespace) -> None:
    """A PNG grid of the first images of a samples file."""
    from modiff.io import load_images
    from modiff.plots import save_grid

    images, _ = load_images(args.samples)
    save_grid(images[: args.n], args.out, nrow=args.nrow, scale=args.scale)


def cmd_bench(args: argparse.Namespace) -> None:
    """Per-step latency, images/s and peak memory for the preset model and CIFAR-10's UNet, next
    to other engines (bench.peers), and each INT8 variant's accuracy against FP32."""
    from modiff.bench import run
    from modiff.report import format_table

    params, preset = _settings(args)
    calibration = None
    if args.calib:
        from modiff.calibration import calibration_meta, load_calibration

        meta = calibration_meta(params, preset, _checkpoint_file(preset, None))
        calibration = load_calibration(args.calib, meta)
    _configure_process(params)
    result = run(params, calibration)
    print(format_table(result["rows"]))
    _write_metrics(result, args.out)


def _variant_files(params: dict[str, Any], folder: str, suffix: str) -> list[str]:
    """``folder/<name><suffix>`` for every variant of the grid."""
    return [f"{folder}/{name}{suffix}" for name in params["variants"]]


def cmd_gather(args: argparse.Namespace) -> None:
    """results/metrics.json (one record per variant), its summary and the FID-against-bits plot."""
    from modiff.io import write_json
    from modiff.results import gather, plot_fid_vs_bits, plot_points, summary

    params, _ = _settings(args)
    records = gather(_variant_files(params, args.metrics_dir, ".json"), args.bench)
    write_json(records, args.out)
    write_json(summary(records), args.summary)
    write_json(plot_points(records), args.plot_data)
    plot_fid_vs_bits(records, args.plot)
    log.info("gathered %d variants into %s", len(records), args.out)


def cmd_report(args: argparse.Namespace) -> None:
    """Write results/report.md from the metrics, benchmark and grids."""
    from modiff.report import write_report

    params, preset = _settings(args)
    damage = [f"{args.metrics_dir}/fp32-noise{s:g}.json" for s in params["damage_check"]["sigmas"]]
    grids = _variant_files(params, args.grids_dir, ".png")
    write_report(params, preset, args.records, args.plot, damage, args.bench, grids, args.out)


def cmd_dvc_yaml(args: argparse.Namespace) -> None:
    """Write dvc.yaml from the stage table (modiff/pipeline.py); --check: fail if it is stale."""
    from modiff.io import write_text
    from modiff.pipeline import dvc_yaml

    text, dest = dvc_yaml(), Path(args.out)
    if args.check:
        if not dest.is_file() or dest.read_text() != text:
            raise ValueError(
                f"{dest} is not generated from modiff/pipeline.py: run `modiff dvc-yaml`"
            )
        return
    write_text(text, dest)
    log.info("wrote %s", dest)


# --- wiring --------------------------------------------------------------------------------------


def _configure_process(params: dict[str, Any]) -> None:
    from modiff.runtime import configure_process  # imports torch: only for commands that use it

    configure_process(params["threads"])


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    p.add_argument("--preset", help="override params.yaml's preset")
    p.add_argument(
        "-S", "--set", action="append", metavar="KEY=VALUE", help="override a setting (dotted key)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modiff", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], settings: bool = True):
        p = sub.add_parser(name, help=func.__doc__.splitlines()[0], description=func.__doc__)
        if settings:
            _add_settings_args(p)
        p.set_defaults(func=func)
        return p

    p = add("fetch", cmd_fetch)
    p.add_argument("--out", help="destination (default: data/checkpoints/<preset>.ckpt)")
    p.add_argument("--url", help="fetch this URL/path instead of the preset's checkpoint")
    p.add_argument("--md5")
    p.add_argument("--sha256")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per network operation")

    p = add("train", cmd_train)
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--summary", help="JSON summary to write")

    p = add("train-classifier", cmd_train_classifier, settings=False)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)

    p = add("sample", cmd_sample)
    p.add_argument("--out", required=True, help=".npz to write")
    p.add_argument("--checkpoint", help="default: data/checkpoints/<preset>.ckpt")
    p.add_argument("--n", type=_positive_int, help="number of images (default: sampling.n_samples)")
    p.add_argument("--start", type=_non_negative_int, default=0, help="index of the first image")
    p.add_argument("--qparams", help="quantization parameters (modiff calibrate); default FP32")
    p.add_argument("--variant", default="fp32", help="the variant's name, recorded with the images")
    p.add_argument("--backend", choices=["auto", "native", "openvino", "simulated"],
                   help="override the file's")  # fmt: skip
    p.add_argument("--shard", type=_non_negative_int, help="sample shard I of sampling.shards")

    p = add("merge", cmd_merge, settings=False)
    p.add_argument("--shards", nargs="+", required=True, help="shard .npz files")
    p.add_argument("--out", required=True, help=".npz to write")

    p = add("damage", cmd_damage)
    p.add_argument("--samples", required=True)
    p.add_argument("--sigma", type=float, required=True, help="noise std on the [-1, 1] scale")
    p.add_argument("--out", required=True, help=".npz to write")

    p = add("calib-data", cmd_calib_data)
    p.add_argument("--out", required=True, help="calibration tensors to write")
    p.add_argument("--checkpoint", help="default: data/checkpoints/<preset>.ckpt")

    p = add("calibrate", cmd_calibrate)
    p.add_argument("--calib", help="calibration data (default: data/calibration/<preset>.pt)")
    p.add_argument("--out", required=True, help="quantization parameters to write")
    p.add_argument("--checkpoint", help="default: data/checkpoints/<preset>.ckpt")
    p.add_argument("--variant", help="an entry of params.yaml's variants (else the flags below)")
    p.add_argument("--w-bits", type=int, default=8)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--a-scale", choices=["static", "dynamic"], default="static")
    p.add_argument("--backend", choices=["auto", "native", "openvino", "simulated"], default="auto")
    p.add_argument("--a-granularity", choices=["per_tensor", "per_sample"], default="per_tensor")
    p.add_argument(
        "--modulation", choices=["none", "compensated", "uncompensated"], default="none",
        help="none: Q-Diff; compensated: MoDiff; uncompensated: the paper's ablation",
    )  # fmt: skip
    p.add_argument("--warmup", default="fp", help="MoDiff first step: fp, quantized or repeat:k")
    p.add_argument(
        "--reconstruction",
        choices=["none", "layer", "block"],
        default="none",
        help="learned weight rounding: AdaRound per layer or per block (BRECQ)",
    )
    p.add_argument(
        "--reconstruction-iters",
        type=_non_negative_int,
        default=2000,
        help="Adam steps per reconstructed unit",
    )
    p.add_argument("--learn-act-scales", action="store_true",
                   help="refine static (MoDiff: residual) activation scales LSQ-style")  # fmt: skip

    p = add("fid", cmd_fid)
    p.add_argument("--samples", required=True)
    p.add_argument("--out", help="metrics JSON to write")
    p.add_argument("--cache-dir", default="data/fid_cache", help="reference statistics cache")
    p.add_argument("--reference-samples", help="FP32 samples from the same x_T: adds PSNR")

    p = add("grid", cmd_grid, settings=False)
    p.add_argument("--samples", required=True)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--n", type=_positive_int, default=100)
    p.add_argument("--nrow", type=_positive_int, default=10)
    p.add_argument("--scale", type=_positive_int, default=4)

    p = add("bench", cmd_bench)
    p.add_argument("--out", help="JSON to write")
    p.add_argument("--calib", help="calibration data (modiff calib-data) for the INT8 accuracy")

    p = add("gather", cmd_gather)
    p.add_argument("--metrics-dir", default="results/metrics", help="per-variant metrics JSON")
    p.add_argument("--bench", required=True, help="benchmark JSON")
    p.add_argument("--out", required=True, help="results/metrics.json to write")
    p.add_argument("--summary", required=True, help="metrics keyed by variant (for `dvc metrics`)")
    p.add_argument("--plot", required=True, help="FID-against-bits PNG to write")
    p.add_argument("--plot-data", required=True, help="the plot's data (for `dvc plots`)")

    p = add("report", cmd_report)
    p.add_argument("--records", required=True, help="results/metrics.json (modiff gather)")
    p.add_argument("--plot", required=True, help="FID-against-bits PNG")
    p.add_argument("--metrics-dir", default="results/metrics", help="per-variant metrics JSON")
    p.add_argument("--grids-dir", default="results/grids", help="sample grid PNGs")
    p.add_argument("--bench", required=True, help="benchmark JSON")
    p.add_argument("--out", required=True)

    p = add("dvc-yaml", cmd_dvc_yaml, settings=False)
    p.add_argument("--out", default="dvc.yaml", help="file to write (default: dvc.yaml)")
    p.add_argument("--check", action="store_true", help="only check that it is up to date")
    return parser


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return n


def main(argv: list[str] | None = None) -> int:
    from modiff.runtime import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from modiff.errors import UserError

    try:
        args.func(args)
    except (UserError, FileNotFoundError, ValueError) as exc:  # ConfigError, CheckpointError, ...
        if args.verbose:
            raise
        print(f"modiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
