"""Everything this project measures on a GPU, in one command: the GPU tests, the deformable
attention benchmark (benchmarks/msda.py) and a whole-model bf16 training step of ``vit_adapter_b``
and of a Mask2Former segmentor, the Triton kernels against the reference op (time, peak memory).

    python benchmarks/gpu_suite.py [--runs 20] [--skip-tests]

Prints the tables MODEL_CARD's GPU section holds, with device, dtype, shapes and date. Written and
checked without a GPU (it exits with a note there); it has not yet run on one.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys

import torch

import vitadapter
from vitadapter.layers import MSDeformAttn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (architecture, image size, batch): the adapter trunk alone and a Mask2Former segmentor on it
TRAINING = [("vit_adapter_b", 512, 2), ("mask2former_beit_adapter_b_512", 512, 2)]


def set_backend(model: torch.nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.backend = backend


def loss_of(output) -> torch.Tensor:
    """A scalar that every output takes part in: the trunk returns a pyramid (a list of maps), a
    segmentor its logits."""
    if isinstance(output, torch.Tensor):
        return output.float().square().mean()
    return sum(level.float().square().mean() for level in output)


def training_step_table(runs: int) -> None:
    print("\n## bf16 autocast training step (forward + backward), Triton vs reference deformable attention\n")
    print("| model | input | backend | median ms | peak MiB |")
    print("|---|---|---|---|---|")
    for arch, size, batch in TRAINING:
        model = vitadapter.create_model(arch).cuda().train()
        image = torch.randn(batch, 3, size, size, device="cuda")
        for backend in ("reference", "triton"):
            set_backend(model, backend)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_of(model(image))
                loss.backward()
                model.zero_grad(set_to_none=True)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            peak = torch.cuda.max_memory_allocated() / 2**20
            print(f"| {arch} | {batch}x3x{size}x{size} | {backend} | {statistics.median(times):.1f} | {peak:.0f} |",
                  flush=True)
        del model
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_suite.py needs a CUDA device; none is available here.")
        return 0
    print(f"# {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    failed = 0
    if not args.skip_tests:
        tests = ["tests/test_msda_op.py", "tests/test_msda.py"]
        failed = subprocess.run([sys.executable, "-m", "pytest", "-q", *tests], cwd=ROOT).returncode
    bench = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "msda.py"), "--runs", str(args.runs * 2)])
    training_step_table(args.runs)
    return failed or bench.returncode


if __name__ == "__main__":
    sys.exit(main())
