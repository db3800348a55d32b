rule calib_data:
    """Time-step-aware calibration inputs (x_t and x_prev) from FP32 trajectories."""
    input:
        unpack(inputs("calib_data")),
    output:
        **outputs("calib_data"),
    params:
        settings=settings("calib_data"),
        files=file_options("calib_data"),
        code=code("calib_data"),
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/calib_data.log",
    benchmark:
        "results/benchmarks/calib_data.tsv"
    shell:
        command("calib_data")


rule calibrate:
    """One variant's quantization parameters (scale search on the calibration data); for fp32 a
    file saying "no quantization", so that every variant samples alike."""
    input:
        unpack(inputs("calibrate")),
    output:
        **outputs("calibrate"),
    params:
        settings=settings("calibrate"),
        files=file_options("calibrate"),
        code=code("calibrate"),
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/calibrate_{variant}.log",
    benchmark:
        "results/benchmarks/calibrate_{variant}.tsv"
    shell:
        command("calibrate")
