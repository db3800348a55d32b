rule calib_data:
    """Time-step-aware calibration inputs (x_t and x_prev) from FP32 trajectories."""
    input:
        ckpt=rules.fetch_checkpoint.output[0],
        code=code("cli", "diffusion", "models", "checkpoint", "fetch", "runtime", "quant",
                  "calibration"),
    output:
        f"data/calibration/{PRESET}.pt",
    params:
        settings=settings(
            "preset", "seed", "threads", "device",
            *preset_keys("model", "data", "diffusion", "checkpoint", "calibration", *CALIB_SAMPLING),
        ),
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/calib_data.log",
    benchmark:
        "results/benchmarks/calib_data.tsv"
    shell:
        "modiff calib-data {params.settings} --out {output} > {log} 2>&1"


rule calibrate:
    """Quantize one variant: weight and activation scale search; saves its parameters."""
    input:
        calib=rules.calib_data.output[0],
        ckpt=rules.fetch_checkpoint.output[0],
        code=code("cli", "models", "checkpoint", "fetch", "quant", "calibration"),
    output:
        "data/quant/{variant}.pt",
    params:
        settings=settings(
            "preset", "seed", "threads", "quant",
            *preset_keys("model", "data", "diffusion", "checkpoint", "calibration", *CALIB_SAMPLING),
        ),
        variant=variant_settings,
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/calibrate_{variant}.log",
    benchmark:
        "results/benchmarks/calibrate_{variant}.tsv"
    shell:
        "modiff calibrate {params.settings} {params.variant} --variant {wildcards.variant}"
        " --calib {input.calib} --out {output} > {log} 2>&1"
