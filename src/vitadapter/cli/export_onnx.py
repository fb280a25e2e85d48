"""``vitadapter export-onnx``: write a model (random, pretrained or from a weights file) as an ONNX file
with dynamic batch, height and width, or a fixed size with ``--static``."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..weights.staging import check_destination
from ._common import UsageError, check_model_name, check_weights_file, side_option, subcommand
from ._models import model_from_options

MIN_ONNX_SIZE = 32


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "export-onnx", "write a model as an ONNX file (dynamic batch, height and width)")
    p.add_argument("model", help="model name (or name.tag, local-dir:, hf-hub:), see `vitadapter list`")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--size", type=side_option, nargs=2, metavar=("H", "W"),
                   help="example image size to trace (default: the model's input size); with --static the only size")
    p.add_argument("--static", action="store_true", help="fix batch 1 and --size instead of dynamic sizes")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="export the model's weights (may download)")
    weights.add_argument("--weights", metavar="FILE", help="load weights from a local file (.safetensors, upstream .pth/.zip)")
    p.set_defaults(run=export_onnx, seed=0)


def export_onnx(args: argparse.Namespace) -> int:
    check_model_name(args.model, "export-onnx")
    if args.weights is not None:
        check_weights_file(args.weights, "--weights")
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"export-onnx {out}: name a .onnx file")
    check_destination(out, "export-onnx")
    if args.size is not None and min(args.size) < MIN_ONNX_SIZE:
        raise UsageError(f"--size {args.size[0]} {args.size[1]}: height and width must be at least {MIN_ONNX_SIZE}")
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it; an optional dependency)
    except ImportError as e:
        raise UsageError("export-onnx needs the onnx and onnxscript packages: pip install 'vitadapter[onnx]'") from e
    import torch  # lazy: startup time

    from ..integrations.onnx import export_onnx as write_onnx

    model, weights = model_from_options(args, torch.device("cpu"))
    path = write_onnx(model, out, size=args.size, dynamic=not args.static)
    height, width = args.size or tuple(model.pretrained_cfg.get("input_size", (3, 512, 512)))[-2:]
    sizes = f"batch 1 x {height} x {width} only" if args.static else f"any batch, height and width (at least {MIN_ONNX_SIZE})"
    print(f"model: {args.model}, weights: {weights or 'random initialisation (no pretrained weights)'}")
    print(f"wrote {path}: input 'image', outputs 'stride4' ... 'stride32'; takes {sizes}")
    return 0
