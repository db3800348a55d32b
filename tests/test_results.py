"""Fast unit tests of the pipeline's result steps (merge, damage, gather) on hand-made files;
the end-to-end run in tests/test_pipeline.py covers them only at smoke scale."""

import json

import numpy as np
import pytest
from conftest import ROOT

from modiff.cli import main
from modiff.io import load_images, save_images
from modiff.records import FidRecord, SampleMeta, VariantRecord
from modiff.results import add_noise, gather, merge_shards, plot_points, summary

SETTINGS = {"variant": "fp32", "preset": "digits", "method": "fp32", "quant": None, "seed": 0,
            "sampling": {"steps": 10}, "device": "cpu", "threads": 2}  # fmt: skip
AVX2 = {"cpu_isa": "avx2"}


def _shard(folder, start, stop, kernels=None, **meta):
    path = folder / f"shard-{start}.npz"
    images = np.full((stop - start, 8, 8, 1), start, np.uint8)
    save_images(path, images, **{**SETTINGS, **meta, "indices": [start, stop],
                                 "kernels": kernels or AVX2})  # fmt: skip
    return path


def test_shards_merge_in_index_order_whatever_order_they_are_given(tmp_path):
    paths = [_shard(tmp_path, 4, 6), _shard(tmp_path, 0, 4), _shard(tmp_path, 6, 9)]
    images, meta = merge_shards(paths)
    assert images.shape == (9, 8, 8, 1)
    assert [int(i[0, 0, 0]) for i in images] == [0] * 4 + [4] * 2 + [6] * 3
    assert meta.indices == [0, 9] and meta.shards == 3 and meta.kernels == AVX2
    assert meta.sampling == SETTINGS["sampling"]
    # The merged file's metadata: the shards' shared settings, then the merged range.
    assert list(meta.to_json()) == [*SETTINGS, "indices", "shards", "kernels"]


def test_shards_from_other_cpus_merge_and_say_so(tmp_path):
    vnni = {"cpu_isa": "avx512_vnni"}
    _, meta = merge_shards([_shard(tmp_path, 0, 2), _shard(tmp_path, 2, 4, kernels=vnni)])
    assert meta.kernels == [AVX2, vnni]


@pytest.mark.parametrize(
    ("ranges", "message"),
    [([(0, 2), (3, 5)], "expected to start at 2"),  # a gap
     ([(0, 3), (2, 5)], "expected to start at 3"),  # an overlap
     ([(1, 3)], "expected to start at 0")],  # the first images missing
)  # fmt: skip
def test_shards_that_do_not_tile_the_range_are_refused(tmp_path, ranges, message):
    with pytest.raises(ValueError, match=message):
        merge_shards([_shard(tmp_path, a, b) for a, b in ranges])


def test_shards_sampled_with_other_settings_are_refused(tmp_path):
    paths = [_shard(tmp_path, 0, 2), _shard(tmp_path, 2, 4, sampling={"steps": 20})]
    with pytest.raises(ValueError, match="sampled with other settings"):
        merge_shards(paths)


def test_merge_command_writes_the_merged_file(tmp_path):
    paths = [str(_shard(tmp_path, 2, 4)), str(_shard(tmp_path, 0, 2))]
    assert main(["merge", "--shards", *paths, "--samples", str(tmp_path / "all.npz")]) == 0
    images, meta = load_images(tmp_path / "all.npz")
    assert len(images) == 4 and meta["indices"] == [0, 4] and meta["shards"] == 2


def test_noise_is_seeded_scaled_and_stays_in_range():
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1)).astype(np.uint8)
    assert np.array_equal(add_noise(images, 0.0, 0), images)
    noisy = add_noise(images, 0.1, 0)
    assert noisy.dtype == np.uint8 and np.array_equal(noisy, add_noise(images, 0.1, 0))
    assert not np.array_equal(noisy, add_noise(images, 0.1, 1))
    diff = noisy.astype(float) - images.astype(float)
    unclipped = (images > 40) & (images < 215)  # 0.1 on [-1, 1] is 12.75 levels
    assert diff[unclipped].std() == pytest.approx(12.75, rel=0.1)


def test_damage_command_names_the_variant_and_sigma(tmp_path):
    save_images(tmp_path / "fp32.npz", np.zeros((4, 8, 8, 1), np.uint8), **SETTINGS,
                indices=[0, 4])  # fmt: skip
    out = tmp_path / "noisy.npz"
    args = ["damage", "--params", str(ROOT / "params.yaml"), "--samples",
            str(tmp_path / "fp32.npz"), "--sigma", "0.05", "--damaged", str(out)]  # fmt: skip
    assert main(args) == 0
    images, meta = load_images(out)
    assert meta["variant"] == "fp32-noise0.05" and meta["noise_sigma"] == 0.05
    assert images.any() and meta["sampling"] == SETTINGS["sampling"]


def test_gather_puts_fp32_first_and_takes_speed_from_the_preset_model(tmp_path):
    def metrics(name, method, **extra):
        record = {"variant": name, "method": method, "backend": "native", "n_samples": 40,
                  "steps": 10, "fid": 1.5, "kid": 0.01, "kid_std": 0.0, "reference": "digits",
                  "feature_extractor": "digits-classifier", "samples": f"{name}.npz",
                  "device": "cpu", "kernels": AVX2, **extra}  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
        return tmp_path / f"{name}.json"

    files = [metrics("qdiff-static-w8a8", "qdiff", a_scale="static", w_bits=8, a_bits=8,
                     psnr_vs_fp32=40.0),
             metrics("fp32", "fp32", backend="fp32")]  # fmt: skip
    rows = [
        {
            "model": "digits",
            "variant": "qdiff-static-w8a8",
            "batch": b,
            "step_ms": 10.0 / b,
            "speedup_vs_fp32": 1.0 + b,
            "cache_mb_per_image": 0.0,
        }
        for b in (1, 16)
    ]
    rows.append({"model": "cifar10", "variant": "qdiff-static-w8a8", "batch": 64, "step_ms": 1.0,
                 "speedup_vs_fp32": 9.0, "cache_mb_per_image": 0.0})  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows}))
    records = [r.to_json() for r in gather(files, tmp_path / "bench.json")]
    assert [r["variant"] for r in records] == ["fp32", "qdiff-static-w8a8"]
    assert VariantRecord.from_json(records[1]).to_json() == records[1]
    fp32, int8 = records
    assert fp32["a_scale"] is None and fp32["w_bits"] == 32 and fp32["step_ms"] is None
    assert int8["bench_batch"] == 16 and int8["speedup_vs_fp32"] == 17.0  # largest batch, digits
    assert int8["psnr_vs_fp32"] == 40.0 and int8["a_bits"] == 8
    assert summary(records)["qdiff-static-w8a8"] == {
        "fid": 1.5, "kid": 0.01, "psnr_vs_fp32": 40.0, "step_ms": 10.0 / 16,
        "speedup_vs_fp32": 17.0,
    }  # fmt: skip
    assert [p["variant"] for p in plot_points(records)] == ["fp32", "qdiff-static-w8a8"]


def test_fid_record_says_what_made_the_samples():
    scores = {"fid": 2.0, "kid": 0.02, "kid_std": 0.0, "n_samples": 4, "reference": "digits",
              "feature_extractor": "digits-classifier"}  # fmt: skip
    quant = {
        "backend": "native",
        "w_bits": 8,
        "a_bits": 4,
        "a_scale": "dynamic",
        "warmup": "fp",
        "a_granularity": "per_tensor",
        "reconstruction": "none",
        "learn_act_scales": False,
    }
    meta = SampleMeta(**{**SETTINGS, "variant": "modiff-dynamic-w8a4", "method": "modiff",
                         "quant": quant, "indices": [0, 4], "kernels": AVX2})  # fmt: skip
    psnr = np.array([30.0, 40.0, np.inf, 20.0])
    record = FidRecord.from_scores(scores, "s.npz", meta, psnr).to_json()
    assert record["variant"] == "modiff-dynamic-w8a4" and record["backend"] == "native"
    assert (record["w_bits"], record["a_bits"], record["a_scale"]) == (8, 4, "dynamic")
    assert record["psnr_vs_fp32"] == 35.0 and record["psnr_vs_fp32_mean"] == 47.5  # inf: 100 dB
    assert record["kernels"] == AVX2 and record["steps"] == 10 and "warmup" not in record
    assert FidRecord.from_json(record).to_json() == record  # one JSON form, both ways
    fp32_meta = SampleMeta(**SETTINGS, indices=[0, 4])
    fp32 = FidRecord.from_scores(scores, "results/samples/fp32.npz", fp32_meta).to_json()
    assert fp32["variant"] == "fp32" and fp32["backend"] == "fp32" and "psnr_vs_fp32" not in fp32
    assert "w_bits" not in fp32


def test_samples_metadata_from_elsewhere_is_refused():
    with pytest.raises(ValueError, match="missing keys \\['device'"):
        SampleMeta.from_json(
            {k: v for k, v in SETTINGS.items() if k != "device"} | {"indices": [0, 1]}
        )
