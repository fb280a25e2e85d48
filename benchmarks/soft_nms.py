"""Time of ``vitadapter.detection.soft_nms.multiclass_soft_nms`` as HTC++ calls it (linear, IoU 0.5,
min_score 1e-3), on synthetic candidates: boxes in clusters inside a 1333x800 image, clipped to it as
mmdet's are, 80 classes, log-uniform scores above min_score (a softmax's spread).

Each row is the median of ``--runs`` calls, in one process with ``--threads`` threads, and says which
kernel path ran: "side by side" (the classes in lockstep), "+ tie replay" (equal scores in different
classes, ordered as mmcv's working array does), or "box by box" (the step-by-step fallback).

    python benchmarks/soft_nms.py [--counts 300 1000 3000 9999] [--runs 5] [--threads 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import vitadapter.detection.soft_nms as sn


def candidates(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 4) class-agnostic boxes and (count, 81) class probabilities, background last, such that
    multiclass_soft_nms keeps about ``count`` (box, class) candidates above 1e-3."""
    boxes_n, classes = max(count // 8, 1), 80
    centres = torch.rand(40, 2, generator=generator) * torch.tensor([1333.0, 800.0])
    c = centres[torch.randint(40, (boxes_n,), generator=generator)] + torch.randn(boxes_n, 2, generator=generator) * 20
    wh = torch.rand(boxes_n, 2, generator=generator) * 150 + 8
    boxes = torch.cat([c - wh / 2, c + wh / 2], 1).clamp(min=0).minimum(torch.tensor([1333.0, 800, 1333, 800]))
    probs = torch.zeros(boxes_n * classes)
    chosen = torch.randperm(boxes_n * classes, generator=generator)[:count]
    probs[chosen] = (10 ** (-3 * torch.rand(count, generator=generator, dtype=torch.float64))).float().clamp(min=1.001e-3)
    return boxes, torch.cat([probs.view(boxes_n, classes), torch.zeros(boxes_n, 1)], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[300, 1000, 3000, 9999])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), device {args.device}")
    print("| candidates | kept | median time (ms) | path |")
    print("|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for count in args.counts:
        boxes, probs = (t.to(args.device) for t in candidates(count, g))
        paths: set[str] = set()
        originals = {name: getattr(sn, name) for name in ("_order_ties", "_soft_nms_in_order")}
        for name, fn in originals.items():
            setattr(sn, name, lambda *a, _n=name, _f=fn, **k: paths.add(_n) or _f(*a, **k))
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            dets, _ = sn.multiclass_soft_nms(boxes, probs, 1e-3, iou_threshold=0.5)
            if dets.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        for name, fn in originals.items():
            setattr(sn, name, fn)
        kept = (probs[:, :-1] > 1e-3).sum().item()
        path = "box by box" if "_soft_nms_in_order" in paths else "side by side" + (" + tie replay" if paths else "")
        print(f"| {kept} | {dets.shape[0]} | {statistics.median(times) * 1e3:.1f} | {path} |")


if __name__ == "__main__":
    main()
