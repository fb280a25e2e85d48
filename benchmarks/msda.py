"""GPU benchmark of deformable attention: reference (pure PyTorch) vs Triton kernels.

Part 1, the op at ViT-Adapter's real shapes, forward and forward+backward, fp32 and bf16:
median time over CUDA-event-timed runs after a warm-up, and peak memory above the inputs. Three
ways: the reference, the Triton op on locations and weights (upstream's contract), and the fused
Triton path the modules use (raw offsets and logits in; softmax and location math in the kernel);
the reference column of the fused path includes its PyTorch softmax and location ops.
Part 2, the whole ``vit_adapter_b`` forward+backward at 512x512, batch 2, bf16 autocast.
Part 0 (no GPU needed), the bytes and instructions model: for each model's real shapes the bytes
one call must move at the least (every input read once, every output written once; the backward's
float32 grad_value buffer zeroed, written back once and read for the cast) and the SASS instructions
the kernels issue per sample-corner (warp instructions of the innermost loop that gathers value
rows, times warps, over the (query, corner) pairs one pass of it gathers), compiled for sm_80 and
sm_90 without a GPU. On a GPU
Part 1 adds the achieved fraction of the device's peak memory bandwidth (bytes model / time).

    python benchmarks/msda.py [--batch 2] [--runs 50] [--model-only]

Without a CUDA device it prints Part 0 only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

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
# Mask2Former's pixel decoder (base: 256 channels, 8 heads) on a 512x512 image: self-attention
# over the stride 8, 16, 32 maps
PIXEL_DECODER = ("M2F pixel decoder@512", [(64, 64), (32, 32), (16, 16)], 8, 32)
POINTS = 4


def op_cases() -> list[tuple[str, list[tuple[int, int]], int, int, int]]:
    """(name, value levels, queries, heads, head dim): each model's injector and extractor."""
    cases = []
    for name, (grids, heads, head_dim) in MODELS.items():
        vit_grid = grids[1]
        cases.append((f"{name} injector", grids, vit_grid[0] * vit_grid[1], heads, head_dim))
        cases.append((f"{name} extractor", [vit_grid], sum(h * w for h, w in grids), heads, head_dim))
    name, grids, heads, head_dim = PIXEL_DECODER
    cases.append((name, grids, sum(h * w for h, w in grids), heads, head_dim))
    return cases


def call_bytes(levels, queries, heads, head_dim, batch, dtype, backward: bool, fused: bool) -> int:
    """The least bytes one call moves (see the module's docstring); locations float32 in the plain
    form (the modules' autocast keeps them there), offsets and logits in ``dtype`` in the fused one."""
    size = torch.tensor([], dtype=dtype).element_size()
    keys = sum(h * w for h, w in levels)
    value = batch * keys * heads * head_dim
    rows = batch * queries * heads * head_dim
    terms = batch * queries * heads * len(levels) * POINTS
    per_point = terms * (2 * size + size) + queries * 2 * size if fused else terms * (2 * 4 + size)
    if not backward:
        return value * size + per_point + rows * size
    grad_value = value * (4 + 4 + 4 + size)  # zero, write back, read for the cast, write the cast
    return rows * size + value * size + 2 * per_point + grad_value


def instruction_model() -> dict:
    """{(arch, dtype, head dim, form, kernel): warp instructions per sample-corner} from the SASS
    of every variant the models launch, compiled in a process of its own (it replaces Triton's
    driver) for the first config the op would launch."""
    head_dims = sorted({d for _, _, d in MODELS.values()} | {PIXEL_DECODER[3]})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    model = {}
    for arch in (80, 90):
        done = subprocess.run(
            [sys.executable, "-m", "vitadapter.kernels.sass", "--arch", str(arch), "--dtypes", "float32,bfloat16",
             "--head-dims", ",".join(map(str, head_dims)), "--levels", "3", "--points", str(POINTS), "--json"],
            capture_output=True, text=True, env=env, check=True)
        for r in json.loads(done.stdout):
            key = (arch, r["dtype"], r["head_dim"], r["form"], r["kernel"])
            model.setdefault(key, (r["corner_instructions"], r["regs"], r["spills"]))
    return model


def model_table_cpu(batch: int) -> None:
    print(f"\n## bytes and instructions model, batch {batch}, {POINTS} points (no GPU needed)\n")
    print("| case | dtype | form | pass | MB moved | sm_80 instr / sample-corner | sm_90 instr / sample-corner |")
    print("|---|---|---|---|---|---|---|")
    model = instruction_model()
    for name, levels, queries, heads, head_dim in op_cases():
        for dtype in (torch.float32, torch.bfloat16):
            for form in ("plain", "fused"):
                for kernel in ("forward", "backward"):
                    moved = call_bytes(levels, queries, heads, head_dim, batch, dtype, kernel == "backward",
                                       form == "fused") / 1e6
                    per = [model[(arch, str(dtype)[6:], head_dim, form, kernel)][0] for arch in (80, 90)]
                    print(f"| {name} | {str(dtype)[6:]} | {form} | {kernel} | {moved:.1f} | {per[0]:.2f} "
                          f"| {per[1]:.2f} |", flush=True)


def peak_bandwidth() -> float:
    """The device's peak memory bandwidth in bytes/s (double data rate x bus width)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8


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
          "| reference MiB | Triton MiB | fused Triton MiB | Triton % of peak bandwidth | fused Triton % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    peak = peak_bandwidth()
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
                moved = {
                    fused: sum(call_bytes(levels, queries, heads, head_dim, batch, dtype, backward, fused)
                               for backward in ((False,) if i == 0 else (False, True)))
                    for fused in (False, True)
                }
                share = {fused: 100 * moved[fused] / (ms[key] * 1e-3) / peak
                         for fused, key in ((False, "triton"), (True, "fused triton"))}
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {label} | {ms['reference']:.3f} | "
                      f"{ms['triton']:.3f} | {ms['fused reference']:.3f} | {ms['fused triton']:.3f} | "
                      f"{mib['reference']:.0f} | {mib['triton']:.0f} | {mib['fused triton']:.0f} | "
                      f"{share[False]:.0f} | {share[True]:.0f} |", flush=True)


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
    parser.add_argument("--model-only", action="store_true", help="Part 0 only")
    args = parser.parse_args()
    print(f"# {datetime.date.today()}, torch {torch.__version__}")
    model_table_cpu(args.batch)
    if args.model_only or not torch.cuda.is_available():
        return
    print(f"# {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"median of {args.runs} CUDA-event-timed runs after 3 warm-ups")
    op_table(args.batch, args.runs)
    model_table(args.runs)


if __name__ == "__main__":
    main()
