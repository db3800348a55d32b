rule gather:
    """results/metrics.json (a record per variant) and the FID-against-bits plot."""
    input:
        metrics=expand("results/metrics/{name}.json", name=ALL_VARIANTS),
        bench=rules.bench.output[0],
        code=code("cli", "results", "io"),
    output:
        metrics="results/metrics.json",
        summary="results/summary.json",
        plot=report("results/plots/fid_vs_abits.png", category="Plots",
                    caption="../report/fid_vs_abits.rst"),
        plot_data="results/plots/fid_vs_abits.json",
    params:
        settings=settings("variants"),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/gather.log",
    benchmark:
        "results/benchmarks/gather.tsv"
    shell:
        "modiff gather {params.settings} --bench {input.bench} --out {output.metrics}"
        " --summary {output.summary} --plot {output.plot} --plot-data {output.plot_data} > {log} 2>&1"


rule report:
    """results/report.md: settings, the paper-shaped table, speed, plots and sample grids."""
    input:
        records=rules.gather.output.metrics,
        plot=rules.gather.output.plot,
        damage=expand("results/metrics/{name}.json", name=DAMAGED),
        bench=rules.bench.output[0],
        grids=expand("results/grids/{name}.png", name=ALL_VARIANTS),
        code=code("cli", "report", "bench"),
    output:
        "results/report.md",
    params:
        settings=settings(
            "preset", "seed", "threads", "device", "quant", "variants", "damage_check",
            *preset_keys("checkpoint", "sampling", "calibration", "fid"),
        ),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    shell:
        "modiff report {params.settings} --records {input.records} --plot {input.plot}"
        " --bench {input.bench} --out {output} > {log} 2>&1"
