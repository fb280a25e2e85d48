"""ONNX export of a vitadapter model: ``export_onnx(model, "model.onnx")``.

Plain ``torch.onnx.export(model, (image,), dynamo=True)`` works as well: while an ONNX export runs,
the deformable attention is written in standard ops (one ``GridSample`` per level and a weighted
sum, see ``msda_op._deform_attn_portable``) instead of the custom op. This helper adds the names
(``image`` in; ``stride4`` ... ``stride32`` out), dynamic batch, height and width, and a clear error
for a model whose graph cannot follow the input size.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..weights.staging import write_with_companions

INPUT_NAME = "image"
OUTPUT_NAMES = ("stride4", "stride8", "stride16", "stride32")
MIN_SIZE = 32


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    size: Optional[Sequence[int]] = None,
    *,
    dynamic: bool = True,
    batch_size: int = 1,
    opset_version: Optional[int] = None,
) -> Path:
    """Write ``model`` (a ViTAdapter) to ``path`` as ONNX; returns the path.

    ``size`` (H, W) is the example image size (default: the model's ``pretrained_cfg`` input size).
    With ``dynamic`` (default) the file takes any batch size and any height and width of at least
    32: onnxruntime runs it on other sizes, with the same crop-to-``ceil(h / stride)`` outputs as
    PyTorch. ``dynamic=False`` fixes the batch (``batch_size``) and ``size``. The model is exported
    in eval mode (BatchNorm running statistics, no drop-path) and put back in its former mode.
    """
    height, width = _size(model, size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    path = Path(path)
    if path.is_dir():  # found now, not after the export's seconds to minutes
        raise ValueError(f"path {path} is a folder: name the .onnx file to write")
    in_chans = getattr(model, "in_chans", 3)
    param = next(model.parameters())
    # a dynamic batch is traced with 2 images: a batch of 1 would be taken for a fixed size
    image = torch.randn(2 if dynamic else batch_size, in_chans, height, width, dtype=param.dtype, device=param.device)
    dynamic_shapes = ({0: "batch", 2: "height", 3: "width"},) if dynamic else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model,
                (image,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset_version,
                verbose=False,
            )
    except Exception as e:
        if not dynamic:
            raise
        raise ValueError(
            f"this model's graph does not follow the input size ({type(e).__name__}: {_first_line(e)}); "
            "export it at a fixed size instead: export_onnx(model, path, size=(H, W), dynamic=False), "
            "or `vitadapter export-onnx MODEL OUT --size H W --static`"
        ) from e
    finally:
        model.train(was_training)
    # a model over 2 GB keeps its weights in PATH.data beside the file
    write_with_companions(path, lambda staging: program.save(staging))
    return path


def _size(model: nn.Module, size: Optional[Sequence[int]]) -> tuple[int, int]:
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, 512, 512)))[-2:]
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= MIN_SIZE for s in size):
        raise ValueError(f"size must be (height, width), each an integer of at least {MIN_SIZE}, got {size!r}")
    return size


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
