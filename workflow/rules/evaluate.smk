rule fid:
    """FID/KID against the preset's reference set, and PSNR against FP32 from the same x_T."""
    input:
        unpack(inputs("fid")),
    output:
        **outputs("fid"),
    params:
        settings=settings("fid"),
        files=file_options("fid"),
        code=code("fid"),
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/fid_{variant}.log",
    benchmark:
        "results/benchmarks/fid_{variant}.tsv"
    shell:
        command("fid")


rule fid_damage:
    """The same scores for FP32's samples with noise added (the metrics must see the damage)."""
    input:
        unpack(inputs("fid_damage")),
    output:
        **outputs("fid_damage"),
    params:
        settings=settings("fid_damage"),
        files=file_options("fid_damage"),
        code=code("fid_damage"),
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/fid_damage_{sigma}.log",
    benchmark:
        "results/benchmarks/fid_damage_{sigma}.tsv"
    shell:
        command("fid_damage")


rule grid:
    """A picture of the first 100 samples (the same x_T in every variant)."""
    input:
        unpack(inputs("grid")),
    output:
        **outputs("grid", grid=dict(category="Sample grids", caption="../report/grid.rst",
                                    labels={"variant": "{variant}"})),
    params:
        settings=settings("grid"),
        files=file_options("grid"),
        code=code("grid"),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/grid_{variant}.log",
    benchmark:
        "results/benchmarks/grid_{variant}.tsv"
    shell:
        command("grid")


rule bench:
    """Per-step latency and memory: the grid on the preset model, FP32/INT8/MoDiff and the peer
    engines on CIFAR-10's UNet; INT8 accuracy against FP32 on the preset model."""
    input:
        unpack(inputs("bench")),
    output:
        **outputs("bench"),
    params:
        settings=settings("bench"),
        files=file_options("bench"),
        code=code("bench"),
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/bench.log",
    benchmark:
        "results/benchmarks/bench.tsv"
    shell:
        command("bench")
