rule gather:
    """results/metrics.json (a record per variant) and the FID-against-bits plot."""
    input:
        unpack(inputs("gather")),
    output:
        **outputs("gather", plot=dict(category="Plots", caption="../report/fid_vs_abits.rst")),
    params:
        settings=settings("gather"),
        files=file_options("gather"),
        code=code("gather"),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/gather.log",
    benchmark:
        "results/benchmarks/gather.tsv"
    shell:
        command("gather")


rule report:
    """results/report.md: settings, the paper-shaped table, speed, plots and sample grids."""
    input:
        unpack(inputs("report")),
    output:
        **outputs("report"),
    params:
        settings=settings("report"),
        files=file_options("report"),
        code=code("report"),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    shell:
        command("report")
