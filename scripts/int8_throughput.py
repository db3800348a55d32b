"""How fast exact int8 can be on this CPU: the ceiling behind the native backend's speed.

1. The CIFAR-10 UNet's conv shapes at one batch size, paired repetitions: FP32 (oneDNN,
   channels-last) against one int8 kernel call on full-range codes (``direct``: exact with
   VNNI, saturating without) and the exact ``split`` scheme (two 7-bit halves, one call with
   twice the input channels). Without VNNI, ``split`` is what exact W8A8 costs.
2. With ``--instructions`` (x86 with AVX2 and gcc): the multiply-accumulate rate of one core
   for the instruction sequences an int8 kernel can use, against FP32 FMA: ``vpmaddubsw``
   (u8 x s8, int16 pairs, saturating), ``vpmaddwd`` (s16 x s16, exact) and, where the CPU has
   it, ``vpdpbusd`` (VNNI, exact).

3. With ``--unet``: the whole CIFAR-10 UNet per DDIM step (random weights), FP32 against plain
   native W8A8 and MoDiff in paired runs, and how much of each INT8 step the integer kernels
   themselves take (``torch.profiler``). FP32's step divided by that kernel time bounds what
   any fusion of the float work (GroupNorm, SiLU, quantize, attention) could reach.

Usage: python scripts/int8_throughput.py [--batch 16] [--repetitions 9] [--instructions] [--unet]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from modiff.bench import BenchCase, BenchSettings, _build, bench_variants, time_variants
from modiff.config import load_params
from modiff.quant import kernels
from modiff.runtime import configure_process

# (in_channels, out_channels, resolution) of the CIFAR-10 UNet's 3x3 convs (ch 128, mult 1,2,2,2)
CONVS = [(128, 128, 32), (256, 256, 16), (256, 256, 8), (256, 256, 4), (512, 256, 16),
         (384, 256, 32)]  # fmt: skip


def _cases(batch: int, cin: int, cout: int, res: int) -> dict:
    """FP32, direct and split versions of one 3x3 conv, as callables."""
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(batch, cin, res, res, generator=g).contiguous(memory_format=cl)
    w_float = torch.randn(cout, cin, 3, 3, generator=g)
    codes = torch.randint(0, 256, x.shape, dtype=torch.uint8, generator=g).contiguous(
        memory_format=cl
    )
    w = torch.randint(-128, 128, (cout, cin, 3, 3), dtype=torch.int8, generator=g)
    ones, zeros = torch.ones(cout), torch.zeros(cout, dtype=torch.long)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    direct = kernels.pack_conv_weight(w, ones, *geometry)
    split = kernels.pack_conv_weight(kernels.repeat_input_channels(w), ones, *geometry)

    def run_split():
        halves = kernels.split_codes(codes, 128, 1)
        return kernels.conv2d(halves, 1.0, 64, split, ones, zeros, None, *geometry)

    return {
        "fp32": lambda: F.conv2d(x, w_float, None, 1, 1),
        "direct": lambda: kernels.conv2d(codes, 1.0, 128, direct, ones, zeros, None, *geometry),
        "split": run_split,
    }


def time_convs(batch: int, repetitions: int) -> list[dict]:
    rows = []
    for cin, cout, res in CONVS:
        cases = _cases(batch, cin, cout, res)
        times = {name: [] for name in cases}
        for run in cases.values():
            run()
        for _ in range(repetitions):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        rows.append({"conv": f"{cin}->{cout} @{res}x{res}", **ms})
    return rows


C_SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#define N 50000000L
#define R 12
static double now(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(void){
  __m256 f[R], fb=_mm256_set1_ps(0.5f), fc=_mm256_set1_ps(0.25f);
  __m256i a[R], acc[R], w16=_mm256_set1_epi16(3), w8=_mm256_set1_epi8(3);
  __m256i ones=_mm256_set1_epi16(1);
  for(int j=0;j<R;j++){
    f[j]=_mm256_set1_ps(j*0.1f); a[j]=_mm256_set1_epi16(j); acc[j]=_mm256_setzero_si256();
  }
  double t=now();
  for(long i=0;i<N;i++){for(int j=0;j<R;j++)f[j]=_mm256_fmadd_ps(f[j],fb,fc);}
  double fma=N*R*8/(now()-t)/1e9;
  t=now();
  for(long i=0;i<N;i++){
    for(int j=0;j<R;j++)acc[j]=_mm256_add_epi32(acc[j],_mm256_madd_epi16(a[j],w16));
    __asm__ volatile("":"+x"(w16));}
  double madd=N*R*16/(now()-t)/1e9;
  t=now();
  for(long i=0;i<N;i++){for(int j=0;j<R;j++)acc[j]=_mm256_add_epi32(acc[j],
    _mm256_madd_epi16(_mm256_maddubs_epi16(a[j],w8),ones)); __asm__ volatile("":"+x"(w8));}
  double maddubs=N*R*32/(now()-t)/1e9;
  double vnni=0;
#ifdef __AVXVNNI__
  t=now();
  for(long i=0;i<N;i++){for(int j=0;j<R;j++)acc[j]=_mm256_dpbusd_avx_epi32(acc[j],a[j],w8);
    __asm__ volatile("":"+x"(w8));}
  vnni=N*R*32/(now()-t)/1e9;
#endif
  long sink=0; for(int j=0;j<R;j++) sink+=_mm256_extract_epi32(acc[j],0)+(long)f[j][0];
  printf("%.2f %.2f %.2f %.2f %ld\n", fma, madd, maddubs, vnni, sink & 1);
  return 0;
}
"""


def instruction_rates() -> dict[str, float] | None:
    """GMAC/s of one core per instruction sequence; None where this cannot be measured."""
    gcc = shutil.which("gcc")
    if gcc is None or "avx2" not in kernels.cpu_flags():
        return None
    flags = ["-O3", "-mavx2", "-mfma"]
    if "avx_vnni" in kernels.cpu_flags():
        flags.append("-mavxvnni")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "rates.c", Path(tmp) / "rates"
        src.write_text(C_SOURCE)
        subprocess.run([gcc, *flags, str(src), "-o", str(exe)], check=True)
        fma, madd, maddubs, vnni = map(float, subprocess.check_output([str(exe)]).split()[:4])
    rates = {"fp32 vfmadd231ps": fma, "int16 vpmaddwd (exact)": madd,
             "u8s8 vpmaddubsw (saturating)": maddubs}  # fmt: skip
    if vnni:
        rates["u8s8 vpdpbusd (VNNI, exact)"] = vnni
    return rates


INT8_KERNELS = ("onednn::qconv2d_pointwise", "onednn::qlinear_pointwise")


def _kernel_ms(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """Milliseconds one model call spends inside the int8 kernels (after two warm-up calls,
    which also fill MoDiff's caches)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x, t)
        model(x * 0.99, t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x * 0.98, t)
    events = prof.key_averages()
    return sum(e.self_cpu_time_total for e in events if e.key.startswith(INT8_KERNELS)) / 1e3


def unet_bound(batch: int, repetitions: int, threads: int) -> list[dict]:
    """Paired step times of FP32, plain W8A8 and MoDiff on the CIFAR-10 UNet, and each INT8
    step's time inside the integer kernels."""
    config = load_params("params.yaml").preset_layout("cifar10")
    case = BenchCase("cifar10", config, "random (timing only)")
    names = ["qdiff-static-w8a8@native", "modiff-static-w8a8@native"]
    settings = BenchSettings(batch_sizes=(batch,), repetitions=repetitions, steps=3,
                             threads=threads, memory=False)  # fmt: skip
    rows = time_variants(case, bench_variants(names), settings)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 500.0)
    for row in rows:
        if row["variant"] in names:
            model = bench_variants([row["variant"]])[row["variant"]](_build(case))
            row["kernel_ms"] = _kernel_ms(model, x, t)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=9)
    parser.add_argument("--instructions", action="store_true", help="also time instructions")
    parser.add_argument("--unet", action="store_true", help="also bound the whole UNet's speedup")
    args = parser.parse_args()
    threads = load_params("params.yaml").threads
    configure_process(threads)
    probe = kernels.probe()
    isa = kernels.isa_record()
    print(f"CPU ISA {isa['cpu_isa']} (oneDNN cap: {isa['onednn_max_cpu_isa']}), "
          f"int8 kernels {probe.describe()}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}")  # fmt: skip
    print("| 3x3 conv | FP32 ms | direct ms (x FP32) | split ms (x FP32) |")
    print("|---|---|---|---|")
    for r in time_convs(args.batch, args.repetitions):
        direct, split = r["fp32"] / r["direct"], r["fp32"] / r["split"]
        print(f"| {r['conv']} | {r['fp32']:.1f} | {r['direct']:.1f} ({direct:.2f}x)"
              f" | {r['split']:.1f} ({split:.2f}x) |")  # fmt: skip
    if args.instructions:
        rates = instruction_rates()
        if rates is None:
            print("instruction rates: need gcc and an x86 CPU with AVX2")
        else:
            fma = rates["fp32 vfmadd231ps"]
            print("\n| instruction sequence (one core) | GMAC/s | x FP32 FMA |\n|---|---|---|")
            for name, rate in rates.items():
                print(f"| {name} | {rate:.1f} | {rate / fma:.2f} |")
    if args.unet:
        rows = unet_bound(args.batch, max(3, args.repetitions // 3), threads)
        fp32 = next(r["step_ms"] for r in rows if r["variant"] == "fp32")
        print(f"\nCIFAR-10 UNet, batch {args.batch}, per DDIM step (FP32 {fp32:.1f} ms)")
        print("| variant (schemes) | step ms (x FP32) | int8 kernels ms | bound: FP32 / kernels |")
        print("|---|---|---|---|")
        for r in rows:
            if "kernel_ms" in r:
                print(f"| {r['variant']} ({r['schemes']}) | {r['step_ms']:.1f} "
                      f"({r['speedup_vs_fp32']:.2f}x) | {r['kernel_ms']:.1f} "
                      f"| {fp32 / r['kernel_ms']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
