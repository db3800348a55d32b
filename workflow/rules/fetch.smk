rule fetch_checkpoint:
    """Download (or copy) the preset's checkpoint and verify its digest."""
    input:
        unpack(inputs("fetch_checkpoint")),
    output:
        **outputs("fetch_checkpoint"),
    params:
        settings=settings("fetch_checkpoint"),
        files=file_options("fetch_checkpoint"),
        code=code("fetch_checkpoint"),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/fetch_checkpoint.log",
    benchmark:
        "results/benchmarks/fetch_checkpoint.tsv"
    shell:
        command("fetch_checkpoint")
