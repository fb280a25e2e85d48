"""CPU forward time of vitadapter against a plain timm ViT of the same size, per FLOP.

Method (../shared/BENCHMARKS.md): fp32, batch 1, 512x512, 2 threads, one process, alternating
runs (adapter, ViT, adapter, ViT, ...), median after a warm-up. FLOPs are counted with
FlopCounterMode under the math SDPA backend so that attention counts on both sides.
"time per FLOP" = (adapter time / ViT time) / (adapter FLOPs / ViT FLOPs): 1.0 means the adapter's
extra work runs as efficiently as the ViT itself. Upstream's own forward cannot run here (it needs
mmcv), so "speed-up vs upstream" compares time ratios to the plain ViT: upstream's ratio from
../shared/BENCHMARKS.md (measured on this machine kind) over the ratio measured now.

    python benchmarks/cpu_forward.py [--sizes t s b] [--runs 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitadapter

PLAIN_VIT = {"t": "deit_tiny_patch16_224", "s": "deit_small_patch16_224", "b": "deit_base_patch16_224"}
# ../shared/BENCHMARKS.md, measured on this machine kind with upstream's pure-PyTorch path:
# upstream forward time / plain timm ViT time, and upstream's time per FLOP
UPSTREAM_TIME_RATIO = {"t": 1.017 / 0.190, "s": 2.169 / 0.506, "b": 4.632 / 1.529}
UPSTREAM_TIME_PER_FLOP = {"t": 2.71, "s": 2.54, "b": 2.06}


def count_flops(model: torch.nn.Module, image: torch.Tensor) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(image)
    return counter.get_total_flops()


def seconds(model: torch.nn.Module, image: torch.Tensor) -> float:
    start = time.perf_counter()
    model(image)
    return time.perf_counter() - start


def measure(size: str, runs: int, resolution: int) -> dict:
    torch.manual_seed(0)
    adapter = vitadapter.create_model(f"vit_adapter_{size}").eval()
    plain = timm.create_model(PLAIN_VIT[size], img_size=resolution, num_classes=0).eval()
    image = torch.randn(1, 3, resolution, resolution)
    flops = (count_flops(adapter, image), count_flops(plain, image))
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for model in (adapter, plain):
            seconds(model, image)
        for _ in range(runs):
            for model, record in zip((adapter, plain), times):
                record.append(seconds(model, image))
    t_adapter, t_plain = (statistics.median(t) for t in times)
    time_per_flop = (t_adapter / t_plain) / (flops[0] / flops[1])
    return {
        "size": size.upper(),
        "adapter_s": t_adapter,
        "vit_s": t_plain,
        "time_ratio": t_adapter / t_plain,
        "flop_ratio": flops[0] / flops[1],
        "gflops": flops[0] / 1e9,
        "time_per_flop": time_per_flop,
        "vs_upstream": UPSTREAM_TIME_RATIO[size] / (t_adapter / t_plain),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["t", "s", "b"], choices=sorted(PLAIN_VIT))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"timm {timm.__version__}, {args.threads} threads, fp32, batch 1, {args.resolution}x{args.resolution}, "
          f"median of {args.runs} alternating runs")
    print("| size | vitadapter | plain timm ViT | time ratio | FLOP ratio | time per FLOP | upstream time per FLOP "
          "| speed-up vs upstream |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        r = measure(size, args.runs, args.resolution)
        print(f"| {r['size']} | {r['adapter_s']:.3f} s | {r['vit_s']:.3f} s | {r['time_ratio']:.2f} | "
              f"{r['flop_ratio']:.2f} | {r['time_per_flop']:.2f} | {UPSTREAM_TIME_PER_FLOP[size]:.2f} | "
              f"{r['vs_upstream']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
