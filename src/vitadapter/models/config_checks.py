"""Checks on model configurations that come from files, run before anything is built.

``config.json`` (``local-dir:`` and ``hf-hub:`` folders) and ``vitadapter convert --upstream-config``
come from elsewhere: a string where a number belongs, zero heads or a depth of a million would
otherwise surface as a ZeroDivisionError inside a layer, an assertion in timm, or a long stall while
a model no machine can hold is allocated. Each problem is a ``ValueError`` naming the field.

Each field is checked on its own, in the model's arguments and in ``trunk_kwargs`` alike; relations
(divisibility, the window list's length, the trunk's size) are checked over the fields given, with
``defaults`` standing in for absent ones.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Optional

from .vit_adapter import UPSTREAM_VIT_DEFAULTS, ViTAdapter

# Ceilings for configurations from elsewhere: above every adapter's trunk (ViT-L: 24 blocks, 1024
# wide; ViT-g: 40 blocks, 1536 wide, 1.1 B parameters; DINOv3's 7B: 40 blocks, 4096 wide, 6.7 B) and
# below what exhausts a machine.
MAX_DEPTH = 64
MAX_WIDTH = 4096
MAX_PARAMETERS = 8_000_000_000
MAX_WINDOW = 1024

_INTS = {  # field: (lowest, highest)
    "in_chans": (1, 64),
    "patch_size": (1, 64),
    "embed_dim": (1, MAX_WIDTH),
    "depth": (1, MAX_DEPTH),
    "num_heads": (1, MAX_WIDTH),
    "pretrain_size": (16, 2048),
    "img_size": (16, 2048),
    "conv_inplane": (1, 1024),
    "n_points": (1, 64),
    "deform_num_heads": (1, MAX_WIDTH),
}
_FLOATS = {  # field: (lowest, highest, whether the lowest is allowed)
    "mlp_ratio": (0.0, 16.0, False),
    "drop_rate": (0.0, 1.0, True),
    "attn_drop_rate": (0.0, 1.0, True),
    "drop_path_rate": (0.0, 1.0, True),
    "deform_ratio": (0.0, 4.0, False),
    "cffn_ratio": (0.0, 16.0, False),
    "init_values": (-1e6, 1e6, True),
    "adapter_norm_eps": (0.0, 1.0, False),
}
_BOOLS = (
    "qkv_bias", "layer_scale", "with_cffn", "add_vit_feature", "use_extra_extractor", "extractor_only",
    "freeze_trunk", "pretrained_trunk", "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias",
)
_CHOICES = {"vit_feature_source": ("interactions", "final")}
# a registered task model's own arguments, beside its backbone's (its heads' sizes), by task
MAX_CLASSES = 65536
_HEAD_INTS = {
    "segmentation": {
        "num_classes": (1, MAX_CLASSES),
        "num_queries": (1, 4096),
        "head_channels": (1, MAX_WIDTH),
        "aux_channels": (1, MAX_WIDTH),
    },
    "detection": {
        "num_classes": (1, MAX_CLASSES),
        "neck_channels": (1, MAX_WIDTH),
        "box_fc_channels": (1, MAX_WIDTH),
        "box_conv_channels": (1, MAX_WIDTH),
        "mask_channels": (1, MAX_WIDTH),
    },
}
_HEAD_BOOLS = {"segmentation": ("auxiliary_head",), "detection": ()}
TASKS = tuple(_HEAD_INTS)


def check_fields(values: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Check each known field of ``values`` on its own (unknown names and ``None`` are left alone)."""
    for field, value in values.items():
        if value is None:
            continue
        if field in _INTS:
            low, high = _INTS[field]
            if not _is_int(value) or not low <= value <= high:
                _fail(source, prefix + field, f"must be an integer from {low} to {high}, got {value!r}")
        elif field in _FLOATS:
            low, high, low_ok = _FLOATS[field]
            if not _is_number(value) or not (low <= value if low_ok else low < value) or value > high:
                _fail(source, prefix + field, f"must be a number {'from' if low_ok else 'above'} {low:g} to {high:g}, got {value!r}")
        elif field in _BOOLS and not isinstance(value, bool):
            _fail(source, prefix + field, f"must be true or false, got {value!r}")
        elif field in _CHOICES and value not in _CHOICES[field]:
            _fail(source, prefix + field, f"must be one of {', '.join(map(repr, _CHOICES[field]))}, got {value!r}")


def check_model_args(args: Any, source: str, prefix: str = "", defaults: Mapping[str, Any] = {}) -> None:
    """Refuse ``ViTAdapter`` keyword arguments read from ``source`` that are unknown, of the wrong type,
    out of range, inconsistent, or too large; ``prefix`` is prepended to field names in messages."""
    if not isinstance(args, Mapping):
        _fail(source, prefix.rstrip(".") or "the model arguments", f"must be an object, got {args!r}")
    unknown = sorted(set(args) - set(inspect.signature(ViTAdapter).parameters))
    if unknown:
        raise ValueError(f"{source}: unknown model argument(s) {', '.join(prefix + str(k) for k in unknown)}")
    check_fields(args, source, prefix)
    trunk, trunk_kwargs = args.get("trunk"), args.get("trunk_kwargs") or {}
    if trunk is not None and not isinstance(trunk, str):
        _fail(source, prefix + "trunk", f"must be a timm model name, got {trunk!r}")
    if not isinstance(trunk_kwargs, Mapping):
        _fail(source, prefix + "trunk_kwargs", f"must be an object, got {trunk_kwargs!r}")
    check_fields(trunk_kwargs, source, prefix + "trunk_kwargs.")

    given = {**defaults, **{k: v for k, v in args.items() if v is not None}}
    ranges = given.get("interaction_indexes")
    if ranges is not None and not (isinstance(ranges, (list, tuple)) and 0 < len(ranges) <= MAX_DEPTH):
        _fail(source, prefix + "interaction_indexes", f"must list 1 to {MAX_DEPTH} block ranges or block numbers, got {ranges!r}")
    # the trunk's shape: upstream's own ViT takes it from the arguments, a timm trunk from trunk_kwargs
    shape = given if trunk is None else {k: v for k, v in trunk_kwargs.items() if v is not None}
    shape_prefix = prefix if trunk is None else prefix + "trunk_kwargs."
    width, depth, heads = shape.get("embed_dim"), shape.get("depth"), shape.get("num_heads")
    windows = given.get("window_size")
    if windows is not None:
        if not isinstance(windows, (list, tuple)) or any(w is not None and not (_is_int(w) and 0 < w <= MAX_WINDOW) for w in windows):
            _fail(source, prefix + "window_size", f"must list one window (1 to {MAX_WINDOW}) or null per block, got {windows!r}")
        if depth is not None and len(windows) != depth:
            _fail(source, prefix + "window_size", f"lists {len(windows)} windows for {depth} blocks")
    if width is not None and heads is not None and width % heads:
        _fail(source, shape_prefix + "num_heads", f"{heads} does not divide embed_dim {width}")
    deform_heads, ratio = given.get("deform_num_heads"), given.get("deform_ratio")
    if width is not None and deform_heads is not None and ratio is not None and int(width * ratio) % deform_heads:
        _fail(source, prefix + "deform_num_heads", f"{deform_heads} does not divide embed_dim x deform_ratio ({int(width * ratio)})")
    ratio = given.get("cffn_ratio")
    if width is not None and ratio is not None and given.get("with_cffn", True) and int(width * ratio) < 1:
        _fail(source, prefix + "cffn_ratio", f"{ratio} leaves the ConvFFN of a {width}-wide model no channels")

    # A ViT block holds 4 width^2 attention and 2 mlp_ratio width^2 MLP weights. Upstream's own ViT
    # takes its defaults for absent sizes; a named timm trunk is sized by timm unless resized here.
    if trunk is None:
        shape = {**UPSTREAM_VIT_DEFAULTS, **shape}
    width, depth, mlp_ratio = shape.get("embed_dim"), shape.get("depth"), shape.get("mlp_ratio", 4.0)
    if width is not None and depth is not None and depth * (4 + 2 * mlp_ratio) * width**2 > MAX_PARAMETERS:
        parameters = depth * (4 + 2 * mlp_ratio) * width**2
        _fail(
            source,
            shape_prefix + "embed_dim",
            f"{width} with depth {depth} and mlp_ratio {mlp_ratio:g} makes a ViT of about {parameters / 1e9:.1f} B "
            f"parameters, over vitadapter's ceiling of {MAX_PARAMETERS / 1e9:g} B for configurations from files",
        )


def upstream_defaults() -> dict[str, Any]:
    """What ``ViTAdapter`` makes of arguments left out: its keyword defaults, upstream's ViT shape."""
    signature = inspect.signature(ViTAdapter).parameters.items()
    return {**{k: p.default for k, p in signature if p.default is not inspect.Parameter.empty}, **UPSTREAM_VIT_DEFAULTS}


def check_pretrained_cfg(cfg: Any, source: str, channels: int = 3, prefix: str = "pretrained_cfg.") -> None:
    """Refuse preprocessing entries from ``source`` that would break the model's users: ``mean`` and
    ``std`` of one finite number per input channel (``std`` positive), an ``input_size`` of 3 sizes."""
    if not isinstance(cfg, Mapping):
        _fail(source, prefix.rstrip("."), f"must be an object, got {cfg!r}")
    for field in ("mean", "std"):
        value = cfg.get(field)
        if value is None:
            continue
        if (
            not isinstance(value, (list, tuple))
            or len(value) != channels
            or not all(_is_number(v) for v in value)
            or (field == "std" and not all(v > 0 for v in value))
        ):
            kind = "positive numbers" if field == "std" else "numbers"
            _fail(source, prefix + field, f"must be {channels} {kind}, one per input channel, got {value!r}")
    size = cfg.get("input_size")
    if size is not None and not (
        isinstance(size, (list, tuple)) and len(size) == 3 and all(_is_int(s) and 0 < s <= 65536 for s in size)
    ):
        _fail(source, prefix + "input_size", f"must be [channels, height, width], got {size!r}")


def check_config_json(config: Mapping[str, Any], source: str, task: Optional[str] = None) -> None:
    """A vitadapter ``config.json``'s ``model_args`` and ``pretrained_cfg``. Its weights come from its
    folder: a ``pretrained_trunk`` that would download others is refused. A task model's (``task``
    "segmentation" or "detection"; None for a backbone) ``model_args`` also hold its heads'
    arguments (``num_classes`` required), and its ``label_names``, when given, one name per class."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be None or one of {', '.join(TASKS)}, got {task!r}")
    model_args = config.get("model_args", {})
    if task is not None and isinstance(model_args, Mapping):
        model_args = dict(model_args)
        heads = {k: model_args.pop(k) for k in [*_HEAD_INTS[task], *_HEAD_BOOLS[task]] if k in model_args}
        _check_head_args(heads, source, task)
        _check_label_names(config.get("pretrained_cfg"), heads["num_classes"], source)
    check_model_args(model_args, source, prefix="model_args.")
    if model_args.get("pretrained_trunk"):
        _fail(source, "model_args.pretrained_trunk", "must be false: the weights come from the model's folder")
    check_pretrained_cfg(config.get("pretrained_cfg", {}), source, input_channels(model_args))


def _check_head_args(heads: Mapping[str, Any], source: str, task: str) -> None:
    if "num_classes" not in heads:
        model = "segmentor" if task == "segmentation" else "detector"
        _fail(source, "model_args.num_classes", f"is missing: a {model}'s config.json gives its class count")
    for field, value in heads.items():
        if field in _HEAD_BOOLS[task]:
            if not isinstance(value, bool):
                _fail(source, "model_args." + field, f"must be true or false, got {value!r}")
            continue
        low, high = _HEAD_INTS[task][field]
        # num_queries may be null: the architecture's own count
        if not (value is None and field == "num_queries") and not (_is_int(value) and low <= value <= high):
            _fail(source, "model_args." + field, f"must be an integer from {low} to {high}, got {value!r}")


def _check_label_names(cfg: Any, num_classes: int, source: str) -> None:
    names = cfg.get("label_names") if isinstance(cfg, Mapping) else None
    if names is None:
        return
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        _fail(source, "pretrained_cfg.label_names", f"must list the class names as strings, got {names!r}")
    if len(names) != num_classes:
        _fail(source, "pretrained_cfg.label_names", f"lists {len(names)} names for {num_classes} classes")


def input_channels(model_args: Mapping[str, Any]) -> int:
    """The image channels of checked ``ViTAdapter`` arguments (a timm trunk's default is 3, as upstream's)."""
    trunk_kwargs = model_args.get("trunk_kwargs") or {}
    return model_args.get("in_chans") or trunk_kwargs.get("in_chans") or UPSTREAM_VIT_DEFAULTS["in_chans"]


def _fail(source: str, field: str, problem: str) -> None:
    raise ValueError(f"{source}: {field} {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
