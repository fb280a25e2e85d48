"""What every command shares: the usage error, argparse types and options, one-line error text, and
the checks of model names, weight files and devices made before torch loads."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .. import _json, catalog

if TYPE_CHECKING:
    import torch

DEBUG_ENV = "VITADAPTER_DEBUG"
DEFAULT_BACKBONE = "vit_adapter_t"
DEFAULT_SEGMENTOR = "upernet_vit_adapter_t"
DEFAULT_DETECTOR = "mask_rcnn_vit_adapter_t"
# the largest --size: 16 x upstream's 512-px scale
MAX_SIZE = 8192


class UsageError(ValueError):
    """A command line that cannot work, found before any model is built."""


def subcommand(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    # SUPPRESS: a subcommand's default must not overwrite a --debug given before the subcommand
    add_debug(p, default=argparse.SUPPRESS)
    return p


def add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")


def size_option(text: str) -> Any:
    """argparse type for --size, so a bad value is reported as a usage error before any work."""
    if text == "original":
        return text
    value = positive_int(text, alternative=" or 'original'")
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"expected a side of at most {MAX_SIZE} px, got {text!r}")
    return value


def side_option(text: str) -> int:
    """argparse type for export-onnx's --size H W."""
    value = positive_int(text)
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"expected a side of at most {MAX_SIZE} px, got {text!r}")
    return value


def positive_int(text: str, alternative: str = "") -> int:
    """argparse type for a count or a side in pixels."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer{alternative}, got {text!r}")
    return value


def one_line(error: BaseException) -> str:
    """An error's message as one line of text (a KeyError's without the quotes its str adds)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def first_few(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def json_object(text: Optional[str], option: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = _json.loads(text, option)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if not isinstance(value, dict):
        raise UsageError(f"{option}: expected a JSON object such as '{{\"drop_path_rate\": 0.2}}'")
    return value


def model_task(name: str) -> Optional[str]:
    """What a registered ``name`` (or ``name.tag``) gives, from the catalog without torch: "segmentation"
    (class logits), "detection" (boxes, classes, masks) or None (a backbone's feature pyramid)."""
    return catalog.load()["architectures"][name.partition(".")[0]].get("task")


def is_segmentor(name: str) -> bool:
    return model_task(name) == "segmentation"


def is_detector(name: str) -> bool:
    return model_task(name) == "detection"


# kind -> (what it gives, the command that runs it, the models of that kind, an example)
_KINDS = {
    "backbone": ("a backbone (a feature pyramid, no classes)", "features", "the vit_adapter_* models", DEFAULT_BACKBONE),
    "segmentor": ("a segmentor (it gives class labels per pixel)", "segment",
                  "the upernet_* and mask2former_* models (`vitadapter list 'upernet*'`, `vitadapter list '*former*'`)",
                  DEFAULT_SEGMENTOR),
    "detector": ("a detector (it gives boxes, classes and masks)", "detect",
                 "the mask_rcnn_* and cascade_mask_rcnn_* models (`vitadapter list '*rcnn*'`)", DEFAULT_DETECTOR),
}
_TASK_KIND = {None: "backbone", "segmentation": "segmentor", "detection": "detector"}


def check_model_name(name: str, option: str, kind: Optional[str] = None) -> None:
    """Refuse an unknown architecture or tag from the catalog, or one of another ``kind`` ("backbone":
    image -> pyramid, "segmentor": image -> class logits, "detector": image -> boxes, classes and
    masks), before torch loads (seconds)."""
    if ":" in name:  # local-dir: and hf-hub: folders are read when the model is built
        return
    entries = catalog.load()
    arch, _, tag = name.partition(".")
    if arch not in entries["architectures"]:
        raise UsageError(f"{option} {name}: unknown model; `vitadapter list` shows the architectures")
    if tag and name not in entries["weights"]:
        tags = ", ".join(n.partition(".")[2] for n in entries["weights"] if n.startswith(f"{arch}."))
        raise UsageError(f"{option} {name}: {arch} has no tag {tag!r}; it has: {tags or 'none'}")
    found = _TASK_KIND[model_task(name)]
    if kind is not None and found != kind:
        what, command = _KINDS[found][:2]
        wanted = _KINDS[kind]
        raise UsageError(f"{option} {name} is {what}: `vitadapter {command} --model {name}` runs it; "
                         f"{wanted[1]} takes {wanted[2]}, e.g. {wanted[3]}")


def check_weights_file(path: str, option: str) -> None:
    """Refuse a missing file, or one that cannot be a checkpoint, before any work (the readers would
    fail later, on a mere pickle opcode)."""
    if not Path(path).is_file():
        raise UsageError(f"{option} {path}: no such file")
    with open(path, "rb") as f:
        start = f.read(9)
    # a zip (torch.save, an upstream release), a pickle (legacy torch.save), or safetensors (an
    # 8-byte header length, then its JSON)
    if not (start.startswith(b"PK") or start.startswith(b"\x80") or start[8:] == b"{"):
        raise UsageError(
            f"{option} {path} is not a checkpoint: expected a torch.save file (.pth, .pth.tar), an upstream "
            "release .zip or a .safetensors file"
        )


def torch_device(name: str) -> "torch.device":
    """The torch device of ``--device NAME`` ("auto": cuda when available), checked to be usable here."""
    import torch  # lazy: startup time (--help and list run without torch)

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found = torch.device(name)
        torch.empty(0, device=found)
    except (RuntimeError, AssertionError) as e:  # an unknown name, or a device this torch cannot use
        raise UsageError(f"--device {name}: {one_line(e)}; try --device cpu") from e
    if found.type == "meta":
        raise UsageError(f"--device {name}: the meta device holds shapes, not values, so nothing can run on it; try --device cpu")
    return found


def check_task_model_options(args: Any, default: str, kind: str) -> None:
    """``--model`` and ``--weights`` of a command that runs a ``kind`` of task model ("segmentor",
    "detector"), checked before torch loads. A folder of weights (``save_pretrained``, ``vitadapter
    convert``) brings its own model: ``--model`` becomes ``local-dir:FOLDER``; else ``default``."""
    if args.weights is not None and Path(args.weights).is_dir():
        folder = Path(args.weights)
        if not (folder / "config.json").is_file():
            raise UsageError(f"--weights {folder}: a folder of weights holds config.json and model.safetensors "
                             "(written by vitadapter.save_pretrained or vitadapter convert); this one has no config.json")
        if args.model is not None:
            raise UsageError(f"--weights {folder} holds its own model (config.json): leave out --model {args.model}")
        args.model = f"local-dir:{folder}"
        return
    args.model = args.model or default
    check_model_name(args.model, "--model", kind=kind)
    if args.weights is not None:
        check_weights_file(args.weights, "--weights")
