"""The Triton kernels as an A100 (sm_80) and an H100 (sm_90) would run them, without a GPU.

The variants the registered models launch (forward and backward, plain and fused, float32 and
bfloat16, head dims 32 and 64, 4 points, one or more levels, every autotune config a GPU would
time), and the fused float16/bfloat16 form at head dim 16 with 8 points (the one form whose
forward takes its own launch config, see kernels/msda.py), are compiled through the op's
registered entry points by ``vitadapter.kernels.sass`` and their machine code read: none may spill
registers to local memory, and the value rows must be gathered with wide loads. Both targets compile at once, each in a process of its own (the compiler
is single-threaded): 80 kernels; the 64 of the models' variants take ~90 CPU-seconds cold (140 s
wall measured on two cores shared with other jobs), less with Triton's on-disk cache warm. The whole range (float16 too, head dims
16 to 128, 8 points: 360 kernels, ~12 CPU-minutes) is ``python -m vitadapter.kernels.sass --arch
80|90``, whose result MODEL_CARD records.
"""
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

triton = pytest.importorskip("triton")
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(TOOLS, "ptxas")),
                                reason="this Triton wheel ships no NVIDIA toolchain")

MATRICES = (
    dict(dtypes=("float32", "bfloat16"), head_dims=(32, 64), points=(4,), forms=("plain", "fused")),
    dict(dtypes=("float16", "bfloat16"), head_dims=(16,), points=(8,), forms=("fused",)),
)
# bits per gather instruction that a value row of each dtype must get at least
GATHER_BITS = {"float32": 128, "float16": 64, "bfloat16": 64}
ELEMENT_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def compile_arch(arch: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    reports = []
    for matrix in MATRICES:
        args = [f"--{name.replace('_', '-')}={','.join(map(str, values))}" for name, values in matrix.items()]
        done = subprocess.run([sys.executable, "-m", "vitadapter.kernels.sass", "--arch", str(arch), "--json", *args],
                              capture_output=True, text=True, env=env, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        reports += json.loads(done.stdout)
    return reports


@pytest.fixture(scope="module")
def reports():
    with ThreadPoolExecutor(2) as pool:
        return [r for arch_reports in pool.map(compile_arch, (80, 90)) for r in arch_reports]


def describe(r: dict) -> str:
    return (f"sm_{r['arch']} {r['dtype']} head dim {r['head_dim']}, {r['points']} points, {r['form']} "
            f"{r['kernel']} (BLOCK_Q {r['block_q']}, {r['num_warps']} warps)")


def test_every_variant_compiles_for_both_targets(reports, capsys):
    from vitadapter.kernels import sass

    with capsys.disabled():  # CI's log keeps the table: a regression in registers or instructions shows
        print("\n" + sass.table([sass.Report(**r) for r in reports]))
    variants = [v for m in MATRICES
                for v in itertools.product((80, 90), m["dtypes"], m["head_dims"], m["points"], m["forms"])]
    for variant in variants:
        kernels = {r["kernel"] for r in reports
                   if (r["arch"], r["dtype"], r["head_dim"], r["points"], r["form"]) == variant}
        assert kernels == {"forward", "backward"}, variant


def test_no_variant_spills(reports):
    spilling = [f"{describe(r)}: {r['stack']} B stack, {r['spills']} spill instructions"
                for r in reports if r["stack"] or r["spills"]]
    assert not spilling, "\n".join(spilling)


def test_value_rows_are_gathered_with_wide_loads(reports):
    """Each thread's share of the four corner rows of every point must be loaded by instructions
    at least GATHER_BITS wide: the bits those instructions move cover at least the gathers' bits."""
    narrow = []
    for r in reports:
        threads = 32 * r["num_warps"]
        corner_bits = r["block_q"] * r["head_dim"] * ELEMENT_BITS[r["dtype"]] // threads
        needed = 4 * r["points"] * corner_bits
        moved = sass_bits(r, "LDG", GATHER_BITS[r["dtype"]])
        if moved < needed:
            narrow.append(f"{describe(r)}: {moved} of {needed} bits per thread in loads of "
                          f">= {GATHER_BITS[r['dtype']]} bits ({r['ops']})")
    assert not narrow, "\n".join(narrow)


def test_grad_value_scatter_is_vectorised_on_sm90(reports):
    """sm_90 has vector float32 atomics: the backward's scatter into grad_value uses them."""
    scalar = [f"{describe(r)}: {r['ops']}" for r in reports
              if r["arch"] == 90 and r["kernel"] == "backward"
              and sass_bits(r, ("RED", "ATOM"), 64) < sass_bits(r, ("RED", "ATOM"))]
    assert not scalar, "\n".join(scalar)


def sass_bits(r: dict, prefix, at_least: int = 0) -> int:
    from vitadapter.kernels import sass

    return sass.Report(**r).bits(prefix, at_least)


def test_bit_widths_are_read_from_opcodes():
    from vitadapter.kernels.sass import _bits

    assert [_bits(op) for op in ("LDG.E.128", "LDG.E.64", "LDG.E", "LDG.E.U16", "STG.E.U8",
                                 "RED.E.ADD.F32.FTZ.RN.STRONG.GPU", "RED.E.ADD.F32x4.FTZ.RN.STRONG.GPU")] == \
        [128, 64, 32, 16, 8, 32, 128]
