"""What the deformable-attention kernels compile to on NVIDIA GPUs, read without a GPU.

Triton's wheel ships NVIDIA's ptxas, cuobjdump and nvdisasm. ``compile_variants`` makes Triton
believe the active device is a GPU of a given compute capability, calls the op's own entry points
(``vitadapter::ms_deform_attn`` and the fused op, forward and backward) with CPU tensors, so each
launch compiles exactly what a real one would (same constants, autotune configs, pointer alignment
and integer specialisation), compiles instead of launching, and reads each kernel's machine code:
registers, stack bytes, spill instructions (LDL/STL), global loads, stores and atomics by width.
The machine code keeps the source line of every instruction, so the value-row gathers (the load in
``msda._corner``) and the grad_value scatter (the atomic in ``msda._scatter``) are told apart from
every other memory instruction, however the compilers unroll the loops.

``python -m vitadapter.kernels.sass --arch 80`` prints the table for every variant the op can
launch (exit status 1 if any spills); ``--json`` gives the reports to a program. Any target this
Triton's ptxas knows can be named (86, 89, 100, 120, ...); CI checks 80 (A100) and 90 (H100/H200).
Run it in a process of its own (``python -m vitadapter.kernels.sass``, or ``compile_variants``
from a subprocess): it replaces Triton's active driver and ``torch.cuda.is_available`` for the
rest of the process, and Triton's interpreter (``TRITON_INTERPRET=1``) must be off.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
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
LEVELS = (1, 2, 3, 4)  # a run-time loop bound: every count launches the same kernel
POINTS = (4, 8)

_MEMORY = re.compile(r"\b((?:LDG|STG|ATOMG|REDG|RED|LDL|STL)(?:\.[A-Za-z0-9_]+)*)")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+([@A-Z].*?)\s*;")


@dataclasses.dataclass
class Report:
    """One compiled kernel."""

    arch: int
    dtype: str
    head_dim: int
    levels: list  # the level counts whose launches compiled to this kernel
    points: int
    form: str  # "plain" or "fused"
    kernel: str
    block_q: int
    num_warps: int
    regs: int
    stack: int
    spills: int
    instructions: int
    corner_instructions: float  # warp instructions per (query, sample corner) in the loop that gathers
    ops: dict  # every global memory and local (spill) instruction, by opcode
    gathers: dict  # the value-row loads, by opcode
    scatters: dict  # the grad_value atomics, by opcode

    def bits(self, prefix, at_least: int = 0, ops: dict | None = None) -> int:
        """Bits one thread moves with the instructions of ``ops`` (default: all) whose opcode starts
        with ``prefix`` and which move at least ``at_least`` bits each."""
        ops = self.ops if ops is None else ops
        return sum(_bits(op) * n for op, n in ops.items() if op.startswith(prefix) and _bits(op) >= at_least)


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

    # the gathers and atomics are found by their source lines (Triton's default keeps them; the
    # line table does not change the code ptxas generates)
    os.environ.pop("TRITON_DISABLE_LINE_INFO", None)
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


def _call_lines(function, callee) -> set[int]:
    """Lines, in their file, of the calls to the Triton function ``callee`` in ``function``'s source."""
    lines, first = inspect.getsourcelines(function.fn)
    call = f"{callee.fn.__name__}("
    return {first + i for i, line in enumerate(lines) if call in line and not line.lstrip().startswith("def ")}


def _parse_listing(listing: str) -> tuple[list[tuple[frozenset, str]], list[tuple[int, int]]]:
    """The instructions of nvdisasm's listing (with ``--print-line-info-inline``) as (source lines,
    instruction text), and its loops as (first, last + 1) instruction index spans: a label and the
    furthest backward branch to it.

    An instruction's source lines are the lines of kernels/msda.py it came from: its own and every
    call site it was inlined through. The call sites are what identifies a role: the line the
    compilers give the innermost frame of an inlined call can be a few lines off, the call sites are
    exact."""
    instructions, labels, loops, chain, fresh = [], {}, {}, set(), True
    for text in listing.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", text)
        instruction = _INSTRUCTION.search(text)
        if text.lstrip().startswith("//##"):
            if fresh:
                chain, fresh = set(), False
            chain |= {int(n) for path, n in re.findall(r'"([^"]+)", line (\d+)', text)
                      if os.path.basename(path) == "msda.py"}
        elif label:
            labels[label.group(1)] = len(instructions)
        elif instruction:
            fresh = True
            target = re.search(r"\bBRA\b.*`\(\.(L_x_\d+)\)", instruction.group(1))
            if target and target.group(1) in labels:
                loops[target.group(1)] = (labels[target.group(1)], len(instructions) + 1)
            instructions.append((frozenset(chain), instruction.group(1)))
    return instructions, list(loops.values())


def analyse(cubin: bytes, block_q: int, num_warps: int, corner_bits: int) -> dict:
    """Registers, stack, spills, instruction counts and memory opcodes of a cubin whose programs take
    ``block_q`` queries on ``num_warps`` warps, each thread gathering ``corner_bits`` of the program's
    rows of one sample corner."""
    from vitadapter.kernels import msda

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        listing = subprocess.run([_tool("nvdisasm"), "--print-line-info-inline", "-c", f.name],
                                 capture_output=True, text=True, check=True).stdout
    regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    instructions, loops = _parse_listing(listing)
    gather_calls = _call_lines(msda._sample_corners, msda._corner)
    scatter_calls = _call_lines(msda._msda_backward_kernel.fn, msda._scatter)
    ops, gathers, scatters = collections.Counter(), collections.Counter(), collections.Counter()
    gather_at = []
    for i, (lines, text) in enumerate(instructions):
        memory = _MEMORY.search(text)
        if not memory:
            continue
        ops[memory.group(1)] += 1
        if lines & gather_calls and memory.group(1).startswith("LDG"):
            gathers[memory.group(1)] += 1
            gather_at.append(i)
        elif lines & scatter_calls and memory.group(1).startswith(("RED", "ATOM")):
            scatters[memory.group(1)] += 1
    # the innermost loop that gathers: the warp instructions of one pass of it over the (query,
    # corner) pairs that pass gathers
    corner_instructions = 0.0
    spans = [(last - first, first, last) for first, last in loops if any(first <= i < last for i in gather_at)]
    if spans:
        length, first, last = min(spans)
        gathered = sum(_bits(_MEMORY.search(instructions[i][1]).group(1)) for i in gather_at if first <= i < last)
        corner_instructions = length * num_warps / (block_q * gathered / corner_bits)
    spills = sum(n for op, n in ops.items() if op.startswith(("LDL", "STL")))
    return dict(regs=regs, stack=stack, spills=spills, instructions=len(instructions),
                corner_instructions=corner_instructions, ops=dict(ops), gathers=dict(gathers), scatters=dict(scatters))


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
    """Compile every combination for ``arch`` and report each kernel once, with the level counts
    whose launches compiled to it."""
    import triton

    _install(arch)
    reports, by_kernel = [], {}
    for dtype, head_dim, n_levels, n_points, form in itertools.product(dtypes, head_dims, levels, points, forms):
        _compiled.clear()
        _launch_form(form, *_inputs(dtype, head_dim, n_levels, n_points))
        for name, block_q, num_warps, kernel in _compiled:
            report = by_kernel.get(id(kernel))
            if report is None:
                corner_bits = block_q * triton.next_power_of_2(head_dim) * torch.finfo(dtype).bits // (32 * num_warps)
                report = by_kernel[id(kernel)] = Report(
                    arch, str(dtype).removeprefix("torch."), head_dim, [], n_points, form,
                    name.removeprefix("_msda_").removesuffix("_kernel"), block_q, num_warps,
                    **analyse(kernel.asm["cubin"], block_q, num_warps, corner_bits))
                reports.append(report)
            if n_levels not in report.levels:
                report.levels.append(n_levels)
    return reports


def _widths(ops: dict) -> str:
    """'128b x8, 32b x2': how many instructions of each width, widest first."""
    by_width = collections.Counter()
    for op, n in ops.items():
        by_width[_bits(op)] += n
    return ", ".join(f"{bits}b x{n}" for bits, n in sorted(by_width.items(), reverse=True))


def table(reports: list[Report]) -> str:
    """Markdown table of ``reports``."""
    rows = ["| sm | dtype | head dim | levels | points | form | kernel | BLOCK_Q, warps | regs | stack B | spill instr "
            "| SASS instr | instr / corner | value-row gathers | grad_value scatter | other global loads |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        loads = {op: n - r.gathers.get(op, 0) for op, n in r.ops.items() if op.startswith("LDG")}
        levels = f"{min(r.levels)}-{max(r.levels)}" if len(r.levels) > 1 else str(r.levels[0])
        rows.append(f"| {r.arch} | {r.dtype} | {r.head_dim} | {levels} | {r.points} | {r.form} | {r.kernel} "
                    f"| {r.block_q}, {r.num_warps} | {r.regs} | {r.stack} | {r.spills} | {r.instructions} "
                    f"| {r.corner_instructions:.2f} | {_widths(r.gathers)} | {_widths(r.scatters)} "
                    f"| {_widths({op: n for op, n in loads.items() if n})} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90,
                        help="compute capability without the dot: 80 (A100), 86, 89, 90 (H100/H200), 100, 120")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--points", default=",".join(map(str, POINTS)))
    parser.add_argument("--forms", default="plain,fused")
    parser.add_argument("--json", action="store_true", help="one JSON list of the reports instead of a table")
    args = parser.parse_args(argv)
    if args.arch < 75:
        parser.error(f"--arch {args.arch}: the NVIDIA tools in Triton's wheel read sm_75 and newer")
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
