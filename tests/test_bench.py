import pytest
from conftest import tiny_config

from modiff.bench import BenchCase, BenchSettings, time_variants
from modiff.cli import bench_variants


def test_bench_times_fp32_int8_and_modiff_in_one_paired_run():
    case = BenchCase("tiny", tiny_config(), "random (timing only)")
    variants = bench_variants(["w8a8-native", "w8a8-native-modiff", "w8a4-simulated-dynamic"])
    settings = BenchSettings(batch_sizes=[2], repetitions=2, steps=3, memory=False)
    rows = time_variants(case, variants, settings)
    by_name = {r["variant"]: r for r in rows}
    assert set(by_name) == {"fp32", "w8a8-native", "w8a8-native-modiff", "w8a4-simulated-dynamic"}
    assert by_name["fp32"]["speedup_vs_fp32"] == 1.0
    assert all(r["step_ms"] > 0 and len(r["step_ms_all"]) == 2 for r in rows)
    assert by_name["w8a8-native-modiff"]["cache_mb_per_image"] > 0
    assert by_name["w8a8-native"]["cache_mb_per_image"] == 0


def test_bad_bench_variant_name():
    with pytest.raises(ValueError, match="w8a8-native"):
        bench_variants(["int8"])
