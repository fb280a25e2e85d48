"""What the deformable-attention kernels compile to on NVIDIA GPUs, read without a GPU.

Triton's wheel ships NVIDIA's ptxas, cuobjdump and nvdisasm. ``compile_variants`` makes Triton
believe the active device is a GPU of a given compute capability, calls the op's own entry points
(``vitadapter::ms_deform_attn`` and the fused op, forward and backward) with CPU tensors, so each
launch compiles exactly what a real one would (same constants, autotune configs, pointer alignment
and integer specialisation), compiles instead of launching, and reads each kernel's machine code:
registers, stack bytes, spill instructions (LDL/STL), global loads, stores and atomics by width.

``python -m vitadapter.kernels.sass --arch 80|90`` prints the table for every variant the op can
launch (exit status 1 if any spills); ``--json`` gives the reports to a program.
Run it in a process of its own (``python -m vitadapter.kernels.sass``, or ``compile_variants``
from a subprocess): it replaces Triton's active driver and ``torch.cuda.is_available`` for the
rest of the process, and Triton's interpreter (``TRITON_INTERPRET=1``) must be off.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 128)
LEVELS = (1, 4)  # the level count is a run-time loop bound: 2 and 3 compile to what 4 does
POINTS = (4, 8)
ARCHS = (80, 90)

_MEMORY = re.compile(r"\b((?:LDG|STG|ATOMG|REDG|RED|LDL|STL)(?:\.[A-Za-z0-9_]+)*)")


@dataclasses.dataclass
class Report:
    """One compiled kernel."""

    arch: int
    dtype: str
    head_dim: int
    levels: int
    points: int
    form: str  # "plain" or "fused"
    kernel: str
    block_q: int
    num_warps: int
    regs: int
    stack: int
    spills: int
    instructions: int
    loop_instructions: int  # SASS instructions in the longest loop body (one level of points)
    ops: dict

    def bits(self, prefix: str, at_least: int = 0) -> int:
        """Bits one thread moves with the instructions whose opcode starts with ``prefix`` and which
        move at least ``at_least`` bits each."""
        return sum(_bits(op) * n for op, n in self.ops.items() if op.startswith(prefix) and _bits(op) >= at_least)


def _bits(op: str) -> int:
    """Access width of a memory instruction: LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32;
    atomics on vectors (.F32x4 and similar) count every lane."""
    parts = op.split(".")
    for part in parts[1:]:
        if part.isdigit():
            return int(part)
        m = re.fullmatch(r"[USF]?(8|16|32|64)(?:X(\d))?", part.upper())
        if m:
            return int(m.group(1)) * int(m.group(2) or 1)
    return 32


class _PretendGPU:
    """Just enough of Triton's driver interface to compile for a target without a GPU."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


def _compile_only_bench(kernel_call, quantiles=None, **kwargs):
    """Autotune's benchmark without a GPU: run (i.e. compile) each config, time none."""
    kernel_call()
    return [1.0, 1.0, 1.0]


_compiled: list = []


def _install(arch: int) -> None:
    """Compile-only launches for ``arch``; every autotune config compiles (the choice is moot)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    from triton.runtime import autotuner, driver, jit

    driver.set_active(_PretendGPU(arch))
    # the kernels choose their autotune configs by whether a GPU is there: compile the GPU's list
    torch.cuda.is_available = lambda: True
    if not hasattr(jit.JITFunction, "_msda_run"):
        jit.JITFunction._msda_run = jit.JITFunction.run

        def compile_and_record(self, *args, grid, warmup, **kwargs):
            kernel = jit.JITFunction._msda_run(self, *args, grid=grid, warmup=True, **kwargs)
            _compiled.append((self.fn.__name__, kwargs["BLOCK_Q"], kwargs.get("num_warps", 4), kernel))
            return kernel

        jit.JITFunction.run = compile_and_record
        autotuner.Autotuner.do_bench = property(lambda self: _compile_only_bench)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _longest_loop(sass: str) -> int:
    """Instructions between a label and the furthest backward branch to it."""
    lines = [ln for ln in sass.splitlines() if ln.strip()]
    labels, count, best = {}, 0, 0
    for ln in lines:
        label = re.match(r"\s*\.(L_x_\d+):", ln)
        if label:
            labels[label.group(1)] = count
        elif re.search(r"/\*[0-9a-f]{4,}\*/", ln):
            count += 1
            target = re.search(r"\bBRA\b.*`\(\.(L_x_\d+)\)", ln)
            if target and target.group(1) in labels:
                best = max(best, count - labels[target.group(1)])
    return best


def analyse(cubin: bytes) -> dict:
    """Registers, stack, spills, instruction count, longest loop and memory opcodes of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    ops = collections.Counter(_MEMORY.findall(sass))
    spills = sum(n for op, n in ops.items() if op.startswith(("LDL", "STL")))
    instructions = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[@A-Z]", sass))
    return dict(regs=regs, stack=stack, spills=spills, instructions=instructions,
                loop_instructions=_longest_loop(sass), ops=dict(ops))


def _inputs(dtype, head_dim, levels, points, heads=2, queries=100, batch=1):
    """CPU inputs of one variant: level maps big enough that every shape argument is a plain int."""
    grids = [(9, 11), (7, 5), (5, 3), (3, 3)][:levels]
    shapes = torch.tensor(grids, dtype=torch.int64)
    starts = torch.cumsum(shapes.prod(1), 0) - shapes.prod(1)
    keys = int(shapes.prod(1).sum())
    value = torch.zeros(batch, keys, heads, head_dim, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, dtype=dtype)
    weights = torch.rand(batch, queries, heads, levels, points, dtype=dtype)
    logits = torch.rand(batch, queries, heads, levels * points, dtype=dtype)
    reference = torch.rand(queries, 2, dtype=dtype)
    grad = torch.zeros(batch, queries, heads * head_dim, dtype=dtype)
    return value, shapes, starts, locations, weights, logits, reference, grad


def _launch_form(form, value, shapes, starts, locations, weights, logits, reference, grad):
    """Forward and backward of one form, through the op's registered entry points."""
    from vitadapter.layers import msda_op

    if form == "plain":
        msda_op._ms_deform_attn_op(value, shapes, starts, locations, weights, "triton")
        msda_op._ms_deform_attn_backward_op(grad, value, shapes, starts, locations, weights, "triton")
    else:
        msda_op._ms_deform_attn_fused_op(value, shapes, starts, reference, locations, logits)
        msda_op._ms_deform_attn_fused_backward_op(grad, value, shapes, starts, reference, locations, logits)


def compile_variants(arch: int, dtypes=DTYPES, head_dims=HEAD_DIMS, levels=LEVELS, points=POINTS,
                     forms=("plain", "fused")) -> list[Report]:
    """Compile every combination for ``arch`` and report each kernel once (a combination whose
    kernel an earlier one already compiled, same specialisation, is not repeated)."""
    _install(arch)
    reports, seen = [], set()
    for dtype, head_dim, n_levels, n_points, form in itertools.product(dtypes, head_dims, levels, points, forms):
        _compiled.clear()
        _launch_form(form, *_inputs(dtype, head_dim, n_levels, n_points))
        for name, block_q, num_warps, kernel in _compiled:
            if id(kernel) in seen:
                continue
            seen.add(id(kernel))
            reports.append(Report(arch, str(dtype).removeprefix("torch."), head_dim, n_levels, n_points, form,
                                  name.removeprefix("_msda_").removesuffix("_kernel"), block_q, num_warps,
                                  **analyse(kernel.asm["cubin"])))
    return reports


def table(reports: list[Report]) -> str:
    """Markdown table of ``reports``."""
    rows = ["| sm | dtype | head dim | levels | points | form | kernel | BLOCK_Q, warps | regs | stack B | spill instr "
            "| SASS instr | loop instr | global loads | atomics |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        loads = ", ".join(f"{op.removeprefix('LDG.E.')} {n}" for op, n in sorted(r.ops.items()) if op.startswith("LDG"))
        atomics = ", ".join(f"{op} {n}" for op, n in sorted(r.ops.items()) if op.startswith(("ATOM", "RED")))
        rows.append(f"| {r.arch} | {r.dtype} | {r.head_dim} | {r.levels} | {r.points} | {r.form} | {r.kernel} "
                    f"| {r.block_q}, {r.num_warps} | {r.regs} | {r.stack} | {r.spills} | {r.instructions} | {r.loop_instructions} "
                    f"| {loads} | {atomics} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=ARCHS, default=90)
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--points", default=",".join(map(str, POINTS)))
    parser.add_argument("--forms", default="plain,fused")
    parser.add_argument("--json", action="store_true", help="one JSON list of the reports instead of a table")
    args = parser.parse_args(argv)
    reports = compile_variants(
        args.arch,
        dtypes=[getattr(torch, d) for d in args.dtypes.split(",")],
        head_dims=[int(d) for d in args.head_dims.split(",")],
        levels=[int(n) for n in args.levels.split(",")],
        points=[int(n) for n in args.points.split(",")],
        forms=args.forms.split(","),
    )
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in reports]))
        return 0
    print(table(reports))
    worst = max(r.spills + r.stack for r in reports)
    print(f"kernels: {len(reports)}, most spill instructions in one: {max(r.spills for r in reports)}, "
          f"largest stack: {max(r.stack for r in reports)} B")
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
