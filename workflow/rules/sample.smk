rule sample_fp32:
    """FP32 DDIM samples of the preset (uint8 images in one .npz)."""
    input:
        ckpt=rules.fetch_checkpoint.output[0],
        code=[PKG[k] for k in ("cli", "diffusion", "models", "checkpoint", "io", "runtime")],
    output:
        "results/samples/fp32.npz",
    params:
        settings=settings(
            "preset", "seed", "threads", "device", *preset_keys("model", "data", "diffusion", "sampling")
        ),
    threads: config["threads"]
    log:
        "results/logs/sample_fp32.log",
    benchmark:
        "results/benchmarks/sample_fp32.tsv"
    shell:
        "modiff sample {params.settings} --checkpoint {input.ckpt} --out {output} > {log} 2>&1"
