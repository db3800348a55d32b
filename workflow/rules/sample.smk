rule sample_shard:
    """One shard (whole batches) of a variant's DDIM samples; shards are separate jobs.

    Temporary: deleted once merged. A killed run keeps its finished shards; a missing shard is
    not remade while the merged file is up to date (DVC, which samples unsharded, has none).
    """
    input:
        ckpt=rules.fetch_checkpoint.output[0],
        qparams=qparams,
        code=code("cli", "config", "diffusion", "models", "checkpoint", "fetch", "io", "runtime",
                  "quant"),
    output:
        temp("results/samples/{variant}/shard-{shard}.npz"),
    params:
        settings=settings(
            "preset", "seed", "threads", "device", *preset_keys("model", "data", "diffusion", "sampling")
        ),
        qparams=lambda wildcards, input: f"--qparams {input.qparams[0]}" if input.qparams else "",
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/sample_{variant}_shard-{shard}.log",
    benchmark:
        "results/benchmarks/sample_{variant}_shard-{shard}.tsv"
    shell:
        "modiff sample {params.settings} --variant {wildcards.variant} {params.qparams}"
        " --shard {wildcards.shard} --out {output} > {log} 2>&1"


rule merge_samples:
    """All shards of a variant in one .npz (bit-identical to one unsharded run)."""
    input:
        shards=expand("results/samples/{{variant}}/shard-{shard}.npz", shard=SHARDS),
        code=code("cli", "results", "io"),
    output:
        "results/samples/{variant}.npz",
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/merge_{variant}.log",
    benchmark:
        "results/benchmarks/merge_{variant}.tsv"
    shell:
        "modiff merge --shards {input.shards} --out {output} > {log} 2>&1"


rule damage:
    """FP32 samples plus Gaussian noise: the metrics must score them clearly worse."""
    input:
        samples="results/samples/fp32.npz",
        code=code("cli", "results", "io"),
    output:
        "results/samples/fp32-noise{sigma}.npz",
    params:
        settings=settings("seed"),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/damage_{sigma}.log",
    benchmark:
        "results/benchmarks/damage_{sigma}.tsv"
    shell:
        "modiff damage {params.settings} --samples {input.samples} --sigma {wildcards.sigma}"
        " --out {output} > {log} 2>&1"
