rule fetch_checkpoint:
    """Download (or copy) the preset's checkpoint and verify its digest."""
    input:
        PKG["cli"],
        PKG["fetch"],
    output:
        f"data/checkpoints/{PRESET}.ckpt",
    params:
        settings=settings("preset", *preset_keys("checkpoint")),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/fetch_checkpoint.log",
    benchmark:
        "results/benchmarks/fetch_checkpoint.tsv"
    shell:
        "modiff fetch {params.settings} > {log} 2>&1"
