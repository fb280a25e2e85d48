"""CPU forward time of a vitadapter model in onnxruntime and in eager PyTorch, in one run.

Method: each model is exported once with ``vitadapter.integrations.onnx.export_onnx`` (dynamic
batch, height and width; traced at 512x512), then run in fp32, eval mode, batch 1 at each
``--sizes`` entry (the export size and others), with ``--threads`` threads in both runtimes
(``torch.set_num_threads`` and onnxruntime's ``intra_op_num_threads``). After a warm-up the two
alternate ``--runs`` times; each column is the median. The largest difference between the two
outputs (relative to the largest PyTorch value) is printed beside them.

    python benchmarks/onnx_cpu.py [--models vit_adapter_t vit_adapter_s] [--sizes 512x512 480x640] [--runs 5]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import vitadapter
from cpu_forward import cpu_name
from vitadapter.integrations.onnx import export_onnx


def measure(name: str, sizes: list[tuple[int, int]], runs: int, threads: int, folder: Path) -> list[dict]:
    torch.manual_seed(0)
    model = vitadapter.create_model(name).eval()
    start = time.perf_counter()
    path = export_onnx(model, folder / f"{name}.onnx", size=(512, 512))
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = []
    for h, w in sizes:
        image = torch.randn(1, 3, h, w)
        feed = {"image": image.numpy()}
        with torch.inference_mode():
            reference = model(image)
        outputs = session.run(None, feed)
        error = max(float(np.abs(o - r.numpy()).max() / r.abs().max()) for o, r in zip(outputs, reference))
        eager, onnx = [], []
        for _ in range(runs):
            with torch.inference_mode():
                t = time.perf_counter()
                model(image)
                eager.append(time.perf_counter() - t)
            t = time.perf_counter()
            session.run(None, feed)
            onnx.append(time.perf_counter() - t)
        rows.append(dict(model=name, size=f"{h}x{w}", eager=statistics.median(eager), onnx=statistics.median(onnx),
                         error=error, export_s=export_s))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_adapter_t", "vit_adapter_s"])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "480x640"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    print(f"{cpu_name()}, {args.threads} threads, fp32, batch 1, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {datetime.date.today()}")
    print("| model | input (HxW) | eager PyTorch | onnxruntime | speed-up | max rel. diff | export |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for row in measure(name, sizes, args.runs, args.threads, Path(folder)):
                print(f"| {row['model']} | {row['size']} | {row['eager'] * 1e3:.0f} ms | {row['onnx'] * 1e3:.0f} ms | "
                      f"{row['eager'] / row['onnx']:.2f}x | {row['error']:.1e} | {row['export_s']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
