"""The Triton kernels as an A100 (sm_80) and an H100 (sm_90) would run them, without a GPU.

Every variant the op can launch (forward and backward, plain and fused, float32/float16/bfloat16,
head dims 16 to 128, 1 to 4 levels, 4 or 8 points, every autotune config a GPU would time) is
compiled through the op's registered entry points by ``vitadapter.kernels.sass`` and its machine
code read: none may spill registers to local memory, the value rows must be gathered with wide
loads and, on sm_90, grad_value scattered with vector atomics. The table of every kernel goes to
CI's log.

360 kernels take about 200 CPU-seconds with Triton's cache empty (the compiler is single-threaded).
They compile in the background, one target after the other, from the moment collection ends
(``tests/conftest.py`` calls ``start_in_background``), on the core that the rest of the suite, torch
on one thread, leaves idle; the tests here wait for the result.
"""
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

triton = pytest.importorskip("triton")
HAS_TOOLCHAIN = os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
pytestmark = pytest.mark.skipif(not HAS_TOOLCHAIN, reason="this Triton wheel ships no NVIDIA toolchain")

ARCHS = (80, 90)
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (16, 32, 64, 128)
LEVELS = (1, 2, 3, 4)
POINTS = (4, 8)
FORMS = ("plain", "fused")
# bits per gather instruction that a value row of each dtype must get at least
GATHER_BITS = {"float32": 128, "float16": 64, "bfloat16": 64}
ELEMENT_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


class BackgroundCompile:
    """Both targets' reports, compiled by ``python -m vitadapter.kernels.sass`` in child processes,
    one target after the other, in a thread; ``stop`` kills a child still running."""

    def __init__(self):
        self._child = None
        self._stopped = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1)
        self._reports = self._pool.submit(lambda: [r for arch in ARCHS for r in self._compile(arch)])

    def _compile(self, arch: int) -> list[dict]:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        matrix = dict(dtypes=DTYPES, head_dims=HEAD_DIMS, levels=LEVELS, points=POINTS, forms=FORMS)
        args = [f"--{name.replace('_', '-')}={','.join(map(str, values))}" for name, values in matrix.items()]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            with self._lock:
                if self._stopped:
                    raise RuntimeError("the session ended before the compile")
                self._child = subprocess.Popen(
                    [sys.executable, "-m", "vitadapter.kernels.sass", "--arch", str(arch), "--json", *args],
                    stdout=out, stderr=err, text=True, env=env)
            code = self._child.wait(timeout=1200)
            out.seek(0)
            err.seek(0)
            assert code == 0, f"sm_{arch}: exit status {code}\n{err.read()[-3000:]}"
            return json.load(out)

    def result(self) -> list[dict]:
        return self._reports.result(timeout=2400)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._child is not None and self._child.poll() is None:
                self._child.kill()
        self._pool.shutdown(wait=True)


_COMPILE = pytest.StashKey[BackgroundCompile]()


def start_in_background(config: pytest.Config) -> BackgroundCompile:
    """Start compiling (once per session); the compile is stopped when the session ends."""
    if HAS_TOOLCHAIN and _COMPILE not in config.stash:
        compiling = config.stash[_COMPILE] = BackgroundCompile()
        config.add_cleanup(compiling.stop)
    return config.stash.get(_COMPILE, None)


@pytest.fixture(scope="module")
def reports(request):
    return start_in_background(request.config).result()


def describe(r: dict) -> str:
    return (f"sm_{r['arch']} {r['dtype']} head dim {r['head_dim']}, {r['points']} points, {r['form']} "
            f"{r['kernel']} (BLOCK_Q {r['block_q']}, {r['num_warps']} warps)")


def test_every_variant_compiles_for_both_targets(reports, capsys):
    from vitadapter.kernels import sass

    with capsys.disabled():  # CI's log keeps the table: a regression in registers or instructions shows
        print("\n" + sass.table([sass.Report(**r) for r in reports]))
    for variant in itertools.product(ARCHS, DTYPES, HEAD_DIMS, POINTS, FORMS):
        kernels = [r for r in reports if (r["arch"], r["dtype"], r["head_dim"], r["points"], r["form"]) == variant]
        assert {r["kernel"] for r in kernels} == {"forward", "backward"}, variant
        for r in kernels:  # the level count is a run-time loop bound: one kernel serves them all
            assert sorted(r["levels"]) == list(LEVELS), (variant, r["kernel"], r["levels"])


def test_no_variant_spills(reports):
    spilling = [f"{describe(r)}: {r['stack']} B stack, {r['spills']} spill instructions"
                for r in reports if r["stack"] or r["spills"]]
    assert not spilling, "\n".join(spilling)


def test_value_rows_are_gathered_with_wide_loads(reports):
    """Every instruction that gathers a value row (told apart from other loads by its source line)
    moves at least GATHER_BITS, and together they gather the four corners of at least one point."""
    narrow = []
    for r in reports:
        threads = 32 * r["num_warps"]
        corner_bits = r["block_q"] * r["head_dim"] * ELEMENT_BITS[r["dtype"]] // threads
        wide = sass_bits(r, "LDG", GATHER_BITS[r["dtype"]], "gathers")
        if sass_bits(r, "LDG", 0, "gathers") != wide or wide < 4 * corner_bits:
            narrow.append(f"{describe(r)}: gathers {r['gathers']}, {4 * corner_bits} bits per thread for a point's "
                          f"corners, every instruction >= {GATHER_BITS[r['dtype']]} bits")
    assert not narrow, "\n".join(narrow)


def test_grad_value_is_scattered_with_vector_atomics_on_sm90(reports):
    """sm_90 has vector float32 atomics: every atomic of the backward's grad_value scatter uses them
    (sm_80 has none: there they are scalar, but they must be found all the same)."""
    backward = [r for r in reports if r["kernel"] == "backward"]
    scalar = [f"{describe(r)}: {r['scatters']}" for r in backward
              if not r["scatters"] or (r["arch"] == 90 and sass_bits(r, ("RED", "ATOM"), 64, "scatters")
                                       != sass_bits(r, ("RED", "ATOM"), 0, "scatters"))]
    assert not scalar, "\n".join(scalar)


def sass_bits(r: dict, prefix, at_least: int = 0, role: str = "ops") -> int:
    from vitadapter.kernels import sass

    return sass.Report(**r).bits(prefix, at_least, r[role])


def test_bit_widths_are_read_from_opcodes():
    from vitadapter.kernels.sass import _bits

    assert [_bits(op) for op in ("LDG.E.128", "LDG.E.64", "LDG.E", "LDG.E.U16", "STG.E.U8",
                                 "RED.E.ADD.F32.FTZ.RN.STRONG.GPU", "RED.E.ADD.F32x4.FTZ.RN.STRONG.GPU")] == \
        [128, 64, 32, 16, 8, 32, 128]


def test_listing_lines_and_loops_are_parsed():
    """Each instruction carries every msda.py line of the chain above it (own line and call sites);
    a backward branch to a label closes a loop."""
    from vitadapter.kernels.sass import _parse_listing

    listing = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_0:",
        '\t//## File "/src/msda.py", line 170 inlined at "/src/msda.py", line 178',
        '\t//## File "/src/msda.py", line 178 inlined at "/src/msda.py", line 283',
        '\t//## File "/src/msda.py", line 283',
        "        /*0010*/              @P0 LDG.E.128 R4, [R2.64] ;",
        "        /*0020*/                   FADD R5, R4, R4 ;",
        '\t//## File "/lib/standard.py", line 5',
        "        /*0030*/              @P1 BRA `(.L_x_0) ;",
        "        /*0040*/                   EXIT ;",
    ])
    instructions, loops = _parse_listing(listing)
    assert instructions == [
        (frozenset(), "MOV R1, c[0x0][0x28]"),
        (frozenset({170, 178, 283}), "@P0 LDG.E.128 R4, [R2.64]"),
        (frozenset({170, 178, 283}), "FADD R5, R4, R4"),
        (frozenset(), "@P1 BRA `(.L_x_0)"),
        (frozenset(), "EXIT"),
    ]
    assert loops == [(1, 4)]
