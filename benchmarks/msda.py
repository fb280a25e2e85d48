"""GPU benchmark of deformable attention: reference (pure PyTorch) vs Triton kernels.

Part 1, the op at ViT-Adapter's real shapes, forward and forward+backward, fp32 and bf16:
median time over CUDA-event-timed runs after a warm-up, and peak memory above the inputs. Three
ways: the reference, the Triton op on locations and weights (upstream's contract), and the fused
Triton path the modules use (raw offsets and logits in; softmax and location math in the kernel);
the reference column of the fused path includes its PyTorch softmax and location ops.
Part 2, the whole ``vit_adapter_b`` forward+backward at 512x512, batch 2, bf16 autocast.

    python benchmarks/msda.py [--batch 2] [--runs 50]

Needs a CUDA device; prints a note and exits otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import statistics

import torch

import vitadapter
from vitadapter.layers import MSDeformAttn
from vitadapter.layers.msda_op import deform_attn_from_projections, ms_deform_attn_op

# name: (pyramid grids at strides 8, 16, 32, deform heads, head dim)
MODELS = {
    "B@512": ([(64, 64), (32, 32), (16, 16)], 12, 32),
    "S@1344x800": ([(100, 168), (50, 84), (25, 42)], 6, 64),
    "L@896": ([(112, 112), (56, 56), (28, 28)], 16, 32),
}


def op_cases() -> list[tuple[str, list[tuple[int, int]], int, int, int]]:
    """(name, value levels, queries, heads, head dim): each model's injector and extractor."""
    cases = []
    for name, (grids, heads, head_dim) in MODELS.items():
        vit_grid = grids[1]
        cases.append((f"{name} injector", grids, vit_grid[0] * vit_grid[1], heads, head_dim))
        cases.append((f"{name} extractor", [vit_grid], sum(h * w for h, w in grids), heads, head_dim))
    return cases


def inputs(levels, queries, heads, head_dim, batch, dtype):
    keys = sum(h * w for h, w in levels)
    value = torch.randn(batch, keys, heads, head_dim, device="cuda", dtype=dtype)
    loc = torch.rand(batch, queries, heads, len(levels), 4, 2, device="cuda") * 1.1 - 0.05
    attn = torch.randn(batch, queries, heads, len(levels) * 4, device="cuda").softmax(-1)
    attn = attn.view(batch, queries, heads, len(levels), 4).to(dtype)
    shapes = torch.tensor(levels, device="cuda")
    starts = torch.cumsum(shapes.prod(1), 0) - shapes.prod(1)
    return value, shapes, starts, loc, attn


def measure(fn, runs: int) -> tuple[float, float]:
    """(median ms, peak MiB allocated above what was allocated before)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def op_table(batch: int, runs: int) -> None:
    print(f"\n## the op, batch {batch}, 4 points\n")
    print("| case | dtype | pass | reference ms | Triton ms | fused: reference ms | fused: Triton ms "
          "| reference MiB | Triton MiB | fused Triton MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, levels, queries, heads, head_dim in op_cases():
        for dtype in (torch.float32, torch.bfloat16):
            value, shapes, starts, loc, attn = inputs(levels, queries, heads, head_dim, batch, dtype)
            ref_points = torch.rand(queries, 2, device="cuda")
            offsets = (torch.randn(*loc.shape, device="cuda") * 2).to(dtype)
            logits = torch.randn(batch, queries, heads, len(levels) * 4, device="cuda", dtype=dtype)
            grad = torch.randn(batch, queries, heads * head_dim, device="cuda", dtype=dtype)
            ops = {
                backend: (lambda v, o, w, b=backend: ms_deform_attn_op(v, shapes, starts, o, w, b), loc, attn)
                for backend in ("reference", "triton")
            }
            for backend in ("reference", "triton"):
                ops[f"fused {backend}"] = (
                    lambda v, o, w, b=backend: deform_attn_from_projections(v, levels, ref_points, o, w, b),
                    offsets,
                    logits,
                )
            results = {key: measure_both(fn, value, where, weights, grad, runs) for key, (fn, where, weights) in ops.items()}
            for i, label in enumerate(("fwd", "fwd+bwd")):
                ms = {key: r[i][0] for key, r in results.items()}
                mib = {key: r[i][1] for key, r in results.items()}
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {label} | {ms['reference']:.3f} | "
                      f"{ms['triton']:.3f} | {ms['fused reference']:.3f} | {ms['fused triton']:.3f} | "
                      f"{mib['reference']:.0f} | {mib['triton']:.0f} | {mib['fused triton']:.0f} |", flush=True)


def measure_both(fn, value, where, weights, grad, runs: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(forward, forward+backward) of ``fn(value, where, weights)``, each as (median ms, peak MiB)."""
    def forward():
        with torch.no_grad():
            fn(value, where, weights)

    def forward_backward():
        args = [t.detach().requires_grad_() for t in (value, where, weights)]
        fn(*args).backward(grad)

    return measure(forward, runs), measure(forward_backward, runs)


def model_table(runs: int) -> None:
    print("\n## vit_adapter_b forward+backward, 512x512, batch 2, bf16 autocast\n")
    print("| backend | ms | peak MiB |")
    print("|---|---|---|")
    model = vitadapter.create_model("vit_adapter_b").cuda().train()
    image = torch.randn(2, 3, 512, 512, device="cuda")
    for backend in ("reference", "triton"):
        for m in model.modules():
            if isinstance(m, MSDeformAttn):
                m.backend = backend

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = sum(level.float().square().mean() for level in model(image))
            loss.backward()
            model.zero_grad(set_to_none=True)

        ms, mib = measure(step, max(5, runs // 5))
        print(f"| {backend} | {ms:.1f} | {mib:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/msda.py needs a CUDA device; none is available here.")
        return
    print(f"# {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"median of {args.runs} CUDA-event-timed runs after 3 warm-ups")
    op_table(args.batch, args.runs)
    model_table(args.runs)


if __name__ == "__main__":
    main()
