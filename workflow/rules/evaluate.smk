rule fid:
    """FID/KID of a variant's samples against the preset's reference set."""
    input:
        samples="results/samples/{variant}.npz",
        code=[PKG[k] for k in ("cli", "metrics", "classifier", "io")],
    output:
        "results/metrics/{variant}.json",
    params:
        settings=settings("preset", "device", *preset_keys("fid")),
    log:
        "results/logs/fid_{variant}.log",
    benchmark:
        "results/benchmarks/fid_{variant}.tsv"
    shell:
        "modiff fid {params.settings} --samples {input.samples} --out {output}"
        " --cache-dir data/fid_cache > {log} 2>&1"


rule grid:
    """A picture of the first 100 samples of a variant."""
    input:
        samples="results/samples/{variant}.npz",
        code=[PKG[k] for k in ("cli", "plots", "io")],
    output:
        report("results/grids/{variant}.png", category="Sample grids", caption="../report/grid.rst"),
    log:
        "results/logs/grid_{variant}.log",
    shell:
        "modiff grid --samples {input.samples} --out {output} > {log} 2>&1"
