rule fid:
    """FID/KID against the preset's reference set, and PSNR against FP32 from the same x_T."""
    input:
        samples="results/samples/{name}.npz",
        reference=reference_samples,
        code=code("cli", "metrics", "classifier", "data", "fetch", "io", "results"),
    output:
        "results/metrics/{name}.json",
    params:
        settings=settings("preset", "device", *preset_keys("fid")),
        reference=lambda wildcards, input: (
            f"--reference-samples {input.reference[0]}" if input.reference else ""
        ),
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/fid_{name}.log",
    benchmark:
        "results/benchmarks/fid_{name}.tsv"
    shell:
        "modiff fid {params.settings} --samples {input.samples} {params.reference} --out {output}"
        " --cache-dir data/fid_cache > {log} 2>&1"


rule grid:
    """A picture of the first 100 samples (the same x_T in every variant)."""
    input:
        samples="results/samples/{name}.npz",
        code=code("cli", "plots", "io"),
    output:
        report("results/grids/{name}.png", category="Sample grids", caption="../report/grid.rst",
               labels={"variant": "{name}"}),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/grid_{name}.log",
    benchmark:
        "results/benchmarks/grid_{name}.tsv"
    shell:
        "modiff grid --samples {input.samples} --out {output} > {log} 2>&1"


rule bench:
    """Per-step latency and memory: the grid on the preset model, FP32/INT8/MoDiff and the peer
    engines on CIFAR-10's UNet; INT8 accuracy against FP32 on the preset model."""
    input:
        code=code("cli", "config", "checkpoint", "fetch", "models", "diffusion", "runtime", "bench",
                  "peers", "quant", "calibration"),
        ckpt=rules.fetch_checkpoint.output[0],
        calib=rules.calib_data.output[0],
    output:
        "results/bench.json",
    params:
        settings=settings(
            "preset", "seed", "threads", "bench", "variants", "quant",
            *preset_keys("model", "data", "diffusion", "checkpoint", "sampling", "calibration"),
            "presets.cifar10.model", "presets.cifar10.data", "presets.cifar10.diffusion",
        ),
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/bench.log",
    benchmark:
        "results/benchmarks/bench.tsv"
    shell:
        "modiff bench {params.settings} --calib {input.calib} --out {output} > {log} 2>&1"
