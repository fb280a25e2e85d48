"""CPU forward time of vitadapter, upstream ViT-Adapter and a plain timm ViT of the same size, in one run.

Method: fp32, batch 1, 512x512, eval mode, ``--threads`` threads, one process. After a warm-up the
models run in turn (vitadapter, upstream, ViT, vitadapter, ...) ``--runs`` times; each column is
the median. Ratios compare numbers of this run only: the CPU and whatever else runs on it change
absolute times. FLOPs are counted as ``vitadapter.catalog.count_flops`` does (attention included).
"time per FLOP" = (vitadapter time / ViT time) / (vitadapter FLOPs / ViT FLOPs): 1.0 means the
adapter's extra work runs as efficiently as the ViT itself.

"page faults" are the process's minor page faults per forward (median), vitadapter / ViT: fresh
memory the allocator maps and the kernel zeroes. glibc's malloc returns buffers above a size
threshold to the system and maps them again on the next forward; the adapter's pyramid-sized
buffers (5376 x dim floats, 50 MB stride-4 maps for B) hit that and the ViT's do not. glibc's
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (set in the environment, see the model
card) change it for all three models; the header line says when they are set.

Upstream is its own segmentation ViTAdapter with its pure-PyTorch deformable attention (see
``upstream_code.py``), given vitadapter's weights so that the outputs can be compared; without
``VITADAPTER_UPSTREAM`` its columns are left out.

    VITADAPTER_UPSTREAM=/path/to/ViT-Adapter.git python benchmarks/cpu_forward.py [--sizes t s b] [--runs 7]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Callable

import timm
import torch

import upstream_code
import vitadapter
from vitadapter.catalog import count_flops

try:
    import resource
except ImportError:  # Windows
    resource = None

PLAIN_VIT = {"t": "deit_tiny_patch16_224", "s": "deit_small_patch16_224", "b": "deit_base_patch16_224"}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def page_faults() -> int:
    if resource is None:  # Windows: the column then reads 0
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def seconds_and_faults(forward: Callable[[torch.Tensor], object], image: torch.Tensor) -> tuple[float, int]:
    faults, start = page_faults(), time.perf_counter()
    forward(image)
    return time.perf_counter() - start, page_faults() - faults


def measure(size: str, runs: int, resolution: int, with_upstream: bool) -> dict:
    torch.manual_seed(0)
    ours = vitadapter.create_model(f"vit_adapter_{size}").eval()
    plain = timm.create_model(PLAIN_VIT[size], img_size=resolution, num_classes=0).eval()
    models = {"ours": ours, "plain": plain.forward_features}
    image = torch.randn(1, 3, resolution, resolution)
    result = {"size": size.upper(), "flop_ratio": count_flops(ours, image) / count_flops(plain, image)}
    if with_upstream:
        upstream = upstream_code.build(ours.model_args)
        vitadapter.upstream.load_checkpoint(ours, {"state_dict": upstream.state_dict()})
        with torch.inference_mode():
            diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours(image), upstream(image)))
        models["upstream"] = upstream
        result["max_rel_diff"] = diff
    times: dict[str, list[float]] = {name: [] for name in models}
    faults: dict[str, list[int]] = {name: [] for name in models}
    with torch.inference_mode():
        for forward in models.values():
            forward(image)
        for _ in range(runs):
            for name, forward in models.items():
                took, faulted = seconds_and_faults(forward, image)
                times[name].append(took)
                faults[name].append(faulted)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result.update(medians)
    result["faults"] = {name: statistics.median(f) for name, f in faults.items()}
    result["time_per_flop"] = medians["ours"] / medians["plain"] / result["flop_ratio"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["t", "s", "b"], choices=sorted(PLAIN_VIT))
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with_upstream = upstream_code.snapshot() is not None

    print(f"# {datetime.date.today()}, {cpu_name()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, timm {timm.__version__}, fp32, batch 1, {args.resolution}x{args.resolution}, "
          f"median of {args.runs} runs in turn" + ("" if with_upstream else f"; no upstream ({upstream_code.ENV} unset)")
          + "".join(f"; {k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")))
    upstream_head = " upstream | speed-up vs upstream | max rel. diff |" if with_upstream else ""
    print(f"| size | vitadapter |{upstream_head} plain timm ViT | time ratio | FLOP ratio | time per FLOP | page faults |")
    print("|---" * (7 + 3 * with_upstream) + "|")
    for size in args.sizes:
        r = measure(size, args.runs, args.resolution, with_upstream)
        upstream_cells = (f" {r['upstream']:.3f} s | {r['upstream'] / r['ours']:.2f}x | {r['max_rel_diff']:.1e} |"
                          if with_upstream else "")
        print(f"| {r['size']} | {r['ours']:.3f} s |{upstream_cells} {r['plain']:.3f} s | {r['ours'] / r['plain']:.2f} | "
              f"{r['flop_ratio']:.2f} | {r['time_per_flop']:.2f} | {r['faults']['ours']:.0f} / {r['faults']['plain']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
