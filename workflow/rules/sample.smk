rule sample_shard:
    """One shard (whole batches) of a variant's DDIM samples; shards are separate jobs.

    Temporary: deleted once merged. A killed run keeps its finished shards; a missing shard is
    not remade while the merged file is up to date (DVC, which samples unsharded, has none).
    """
    input:
        unpack(inputs("sample")),
    output:
        samples=temp("results/samples/{variant}/shard-{shard}.npz"),
    params:
        settings=settings("sample"),
        files=file_options("sample"),
        code=code("sample"),
    threads: config["threads"]
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/sample_{variant}_shard-{shard}.log",
    benchmark:
        "results/benchmarks/sample_{variant}_shard-{shard}.tsv"
    shell:
        command("sample", extra="--shard {wildcards.shard}")


rule merge_samples:
    """All shards of a variant in one .npz (bit-identical to one unsharded run)."""
    input:
        shards=expand("results/samples/{{variant}}/shard-{shard}.npz", shard=SHARDS),
    output:
        **outputs("sample"),
    params:
        settings=settings("merge"),
        files=file_options("merge"),
        code=code("merge"),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/merge_{variant}.log",
    benchmark:
        "results/benchmarks/merge_{variant}.tsv"
    shell:
        command("merge")


rule damage:
    """FP32 samples plus Gaussian noise: the metrics must score them clearly worse."""
    input:
        unpack(inputs("damage")),
    output:
        **outputs("damage"),
    params:
        settings=settings("damage"),
        files=file_options("damage"),
        code=code("damage"),
    conda:
        "../envs/modiff.yaml"
    log:
        "results/logs/damage_{sigma}.log",
    benchmark:
        "results/benchmarks/damage_{sigma}.tsv"
    shell:
        command("damage")
