rule bench:
    """Per-step latency and memory (preset model and the CIFAR-10 UNet), ratios vs FP32."""
    input:
        code=[PKG[k] for k in ("cli", "models", "diffusion", "runtime")] + ["modiff/bench.py"],
        ckpt=rules.fetch_checkpoint.output[0],
    output:
        "results/bench.json",
    params:
        settings=settings(
            "preset", "threads", "bench", *preset_keys("model", "data", "diffusion", "checkpoint")
        ),
    threads: config["threads"]
    log:
        "results/logs/bench.log",
    shell:
        "modiff bench {params.settings} --out {output} > {log} 2>&1"


rule report:
    """results/report.md: settings, metrics, speed and sample grids."""
    input:
        metrics=["results/metrics/fp32.json"],
        bench="results/bench.json",
        grids=["results/grids/fp32.png"],
        code=[PKG["cli"], "modiff/report.py"],
    output:
        "results/report.md",
    params:
        settings=settings("preset", "seed", "threads", "device", *preset_keys("checkpoint", "sampling")),
    log:
        "results/logs/report.log",
    shell:
        "modiff report {params.settings} --metrics {input.metrics} --bench {input.bench}"
        " --grids {input.grids} --out {output} > {log} 2>&1"
