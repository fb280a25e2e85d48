"""``vitadapter convert``: turn an upstream checkpoint (a backbone, a whole segmentor or detector) into a new folder
of config.json + model.safetensors that ``create_model('local-dir:...')`` loads."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .. import _json, catalog
from ..weights.staging import staging_folder
from ._common import UsageError, check_model_name, check_weights_file, json_object, subcommand

if TYPE_CHECKING:
    import torch

    from ..converters.backbone import Conversion


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "convert", "turn an upstream checkpoint into a folder of config.json + model.safetensors")
    p.add_argument("src", help="upstream checkpoint (.pth, .pth.tar or release .zip)")
    p.add_argument("dst", help="folder to create; load it with create_model('local-dir:DST', pretrained=True)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help="registered architecture (or arch.tag) the checkpoint belongs to: a backbone "
                                      "(task heads dropped), a segmentor (upernet_*, mask2former_*) or a detector "
                                      "(mask_rcnn_*, cascade_mask_rcnn_*: the whole model)")
    which.add_argument(
        "--upstream-config",
        metavar="FILE",
        help='JSON {"codebase": "segmentation"|"detection", "backbone": {upstream model.backbone}}',
    )
    p.add_argument("--model-kwargs", metavar="JSON",
                   help='with --arch: other create_model arguments, e.g. \'{"head_channels": 256}\' (a segmentor\'s '
                        'or detector\'s class count comes from the checkpoint)')
    p.set_defaults(run=convert)


def convert(args: argparse.Namespace) -> int:
    check_weights_file(args.src, "convert")
    if args.arch:
        check_model_name(args.arch, "--arch")
    elif args.model_kwargs is not None:
        raise UsageError("--model-kwargs goes with --arch: an --upstream-config file holds the whole configuration")
    model_kwargs = json_object(args.model_kwargs, "--model-kwargs")
    dst = Path(args.dst)
    if dst.exists():
        raise _exists(dst)
    task = _task(args.arch) if args.arch else None
    if task == "detection":
        return _convert_detector(args.src, args.arch, model_kwargs, dst)
    if task == "segmentation":
        return _convert_segmentor(args.src, args.arch, model_kwargs, dst)
    from ..weights.read import read_weights  # lazy: startup time
    from ..models.checkpoints import load_checkpoint

    model, pretrained_cfg = _model_to_convert(args, model_kwargs)
    # One line per step on stderr: readable in a terminal and in a log file alike.
    _step(1, f"reading {args.src}")
    checkpoint = read_weights(args.src)
    _step(2, "converting keys")
    conversion = load_checkpoint(model, checkpoint)
    _step(3, f"writing {dst}")
    _save_new_folder(model, dst, pretrained_cfg)
    _print_summary(model, conversion, dst)
    return 0


def _convert_segmentor(src: str, arch: str, model_kwargs: dict[str, Any], dst: Path) -> int:
    """A whole segmentation checkpoint (backbone.*, decode_head.*, auxiliary_head.*) into the folder of
    registered segmentor ``arch``, built for the checkpoint's class count and loaded strictly."""
    from .. import create_model  # lazy: startup time
    from ..converters.mmseg import checkpoint_num_classes
    from ..models.checkpoints import load_segmentor_checkpoint
    from ..weights.read import read_weights
    from ..converters.backbone import Conversion

    _step(1, f"reading {src}")
    checkpoint = read_weights(src)
    classes = checkpoint_num_classes(checkpoint)
    model = create_model(arch, **dict({} if classes is None else {"num_classes": classes}, **model_kwargs))
    _step(2, "converting keys")
    dropped = load_segmentor_checkpoint(model, checkpoint)
    _step(3, f"writing {dst}")
    _save_new_folder(model, dst, None)
    _print_summary(model, Conversion(model.state_dict(), dropped, []), dst)
    return 0


def _convert_detector(src: str, arch: str, model_kwargs: dict[str, Any], dst: Path) -> int:
    """A whole detection checkpoint (backbone.*, neck.*, rpn_head.*, roi_head.*) into the folder of
    registered detector ``arch``, built for the checkpoint's class count and loaded strictly."""
    from .. import create_model  # lazy: startup time
    from ..converters import mmdet
    from ..converters.backbone import Conversion
    from ..models.checkpoints import load_detector_checkpoint
    from ..weights.read import as_dict, read_weights, unwrap

    _step(1, f"reading {src}")
    checkpoint = read_weights(src)
    classes = mmdet.checkpoint_num_classes(unwrap(as_dict(checkpoint, src), split_backbone=False)[0])
    model = create_model(arch, **dict({} if classes is None else {"num_classes": classes}, **model_kwargs))
    _step(2, "converting keys")
    dropped = load_detector_checkpoint(model, checkpoint)
    _step(3, f"writing {dst}")
    _save_new_folder(model, dst, None)
    _print_summary(model, Conversion(model.state_dict(), dropped, []), dst)
    return 0


def _task(arch: str) -> Optional[str]:
    """"detection" or "segmentation" for a registered task model (from the catalog, without torch),
    None for a backbone."""
    return catalog.load()["architectures"][arch.partition(".")[0]].get("task")


def _step(n: int, what: str) -> None:
    print(f"convert [{n}/3] {what}", file=sys.stderr, flush=True)


def _model_to_convert(
    args: argparse.Namespace, arch_kwargs: dict[str, Any]
) -> tuple["torch.nn.Module", Optional[dict[str, Any]]]:
    """The backbone the checkpoint is converted for, and pretrained_cfg entries for its config.json."""
    from .. import create_model, load_upstream  # lazy: startup time
    from ..models.config_checks import check_pretrained_cfg, input_channels
    from ..models.from_upstream import model_kwargs

    if args.arch:
        return create_model(args.arch, pretrained=False, **arch_kwargs), None
    path = Path(args.upstream_config)
    try:
        spec = _json.loads(path.read_text(), f"--upstream-config {path}")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--upstream-config {path}: no such file") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--upstream-config {path} is not valid JSON ({e})") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("backbone"), dict) or "codebase" not in spec:
        shape = '{"codebase": ..., "backbone": {...}} (and optionally "pretrained_cfg": {...})'
        raise ValueError(f"--upstream-config {path} must hold a JSON object {shape}")
    unknown = sorted(set(spec) - {"codebase", "backbone", "pretrained_cfg"})
    if unknown:
        raise ValueError(f"--upstream-config {path} has unknown entries: {', '.join(unknown)}")
    # every value is checked before the model is built
    channels = input_channels(model_kwargs(spec["backbone"], spec["codebase"]))
    check_pretrained_cfg(spec.get("pretrained_cfg", {}), f"--upstream-config {path}", channels)
    return load_upstream(spec["backbone"], spec["codebase"]), spec.get("pretrained_cfg")


def _save_new_folder(model: "torch.nn.Module", dst: Path, pretrained_cfg: Optional[dict[str, Any]]) -> None:
    """Write into a staging folder beside ``dst`` and rename it: an error leaves no partial ``dst``, and
    a killed run's staging folder is removed by the next run (``vitadapter.staging``)."""
    from ..hub import save_pretrained  # lazy: startup time

    with staging_folder(dst) as staging:
        save_pretrained(model, staging, pretrained_cfg)
        try:
            staging.rename(dst)
        except OSError as e:
            if dst.exists():  # another convert to the same destination finished first
                raise _exists(dst) from e
            raise


def _exists(dst: Path) -> ValueError:
    return UsageError(f"{dst} already exists: convert writes a new folder, pick another name or remove it")


def _print_summary(model: "torch.nn.Module", conversion: "Conversion", dst: Path) -> None:
    state, fresh = model.state_dict(), set(conversion.initialised)
    kept = [k for k in state if k not in fresh]
    params = sum(state[k].numel() for k in kept if state[k].is_floating_point())
    print(f"kept {len(kept)} tensors ({params:,} values) from the checkpoint")
    if conversion.initialised:
        print(f"initialised fresh (not in the checkpoint): {len(conversion.initialised)} adapter tensors")
    groups = Counter(key.split(".", 1)[0] for key in conversion.dropped)
    dropped = ", ".join(f"{group} ({n})" for group, n in sorted(groups.items())) or "nothing"
    print(f"dropped {len(conversion.dropped)} keys: {dropped}")
    print(f"wrote {dst}")
