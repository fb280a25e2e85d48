"""Upstream ViT-Adapter configs and checkpoints -> vitadapter models.

The only module that knows upstream's names: the mm-style ``model.backbone`` dicts of the
segmentation and detection codebases and the checkpoint key layout. It also reads
``torch.save`` files and upstream's ``.zip`` release archives without running code from them, and
turns every supported checkpoint layout (upstream's, vitadapter's own, a timm ImageNet ViT) into a
ViTAdapter state dict.
"""
from __future__ import annotations

import math
import os
import pickle
import shutil
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Union

import torch
from timm.models import adapt_input_conv
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_filter

from .config_checks import check_fields, check_model_args, upstream_defaults
from .converters import dinov2, dinov3, uniperceiver
from .models.vit_adapter import ViTAdapter
from .staging import staging_folder
from .trunks import trunk_state_from_timm
from .trunks.beit import beit_state_for

Checkpoint = Union[str, os.PathLike, Mapping[str, Any]]

CODEBASES = ("segmentation", "detection", "dinov2", "dinov3")
# codebases whose configs and keys live in their own converter module
_FOREIGN = {"dinov2": dinov2, "dinov3": dinov3}

# upstream ViTAdapter / TIMMVisionTransformer kwargs that map one-to-one onto ViTAdapter's
_SAME_NAME = (
    "pretrain_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
    "layer_scale", "drop_rate", "attn_drop_rate", "drop_path_rate", "conv_inplane", "n_points",
    "deform_num_heads", "deform_ratio", "init_values", "interaction_indexes", "with_cffn", "cffn_ratio",
    "add_vit_feature", "use_extra_extractor",
)
_TYPES = ("ViTAdapter", "BEiTAdapter", "UniPerceiverAdapter")
# accepted and without effect on the computed function (weights come from ``checkpoint``;
# ``_delete_`` is an mm-config merge directive, present when a config file's dict is pasted as is)
_IGNORED = ("pretrained", "num_classes", "with_cp", "_delete_")


def load_upstream(
    backbone_cfg: Mapping[str, Any],
    codebase: str,
    checkpoint: Optional[Checkpoint] = None,
) -> ViTAdapter:
    """Build the exact equivalent of a foreign adapter config and load its weights.

    ``codebase`` names the code the config comes from:

    - "segmentation" / "detection": upstream ViT-Adapter's ``model.backbone`` dict (``type``
      ``ViTAdapter``, ``BEiTAdapter`` or ``UniPerceiverAdapter``). The segmentation codebase adds each
      interaction's ViT output to its pyramid level, the detection codebase the final one (and uses windows);
    - "dinov2": the kwargs of DINOv2's segmentation ``ViTAdapter``;
    - "dinov3": ``{"vit": DinoVisionTransformer kwargs, "adapter": DINOv3_Adapter kwargs}``.

    ``checkpoint`` is a path (``.pth``, ``.pth.tar``, release ``.zip``) or an already loaded dict in
    that code's own key layout (``state_dict``/``model`` wrappers and ``module.`` prefixes are
    accepted; upstream's ``backbone.`` prefix is stripped and head keys dropped). ``with_cp`` turns
    on activation checkpointing as the config asks.
    """
    foreign = _FOREIGN.get(codebase)
    model = ViTAdapter(**model_kwargs(backbone_cfg, codebase))
    if backbone_cfg.get("with_cp") or backbone_cfg.get("adapter", {}).get("with_cp"):
        model.set_grad_checkpointing(True)
    if checkpoint is not None:
        if foreign is None:
            load_checkpoint(model, checkpoint)
        else:
            state = _foreign_state(checkpoint, codebase)
            state = foreign.convert_state(state, model)
            check_state_dict(model, state)
            model.load_state_dict(state)
    return model


def model_kwargs(backbone_cfg: Mapping[str, Any], codebase: str) -> dict[str, Any]:
    """The ``ViTAdapter`` keyword arguments of a foreign adapter config (``codebase`` as in
    ``load_upstream``), every value checked (``vitadapter.config_checks``) before anything is built."""
    if codebase not in CODEBASES:
        raise ValueError(f"codebase must be one of {CODEBASES}, got {codebase!r}")
    if not isinstance(backbone_cfg, Mapping):
        raise TypeError(f"config must be a dict, got {type(backbone_cfg).__name__}")
    foreign = _FOREIGN.get(codebase)
    kwargs = foreign.adapter_kwargs(backbone_cfg) if foreign else upstream_kwargs(backbone_cfg, codebase)
    check_model_args(kwargs, _source(codebase), defaults=upstream_defaults())
    return kwargs


def _source(codebase: str) -> str:
    return f"the {codebase} backbone config"


def _foreign_state(checkpoint: Checkpoint, codebase: str) -> dict[str, Any]:
    """The state dict of a DINOv2/DINOv3 adapter checkpoint: wrappers and ``module.`` go; for DINOv2 a
    whole segmentor's ``backbone.`` keys are kept (DINOv3 keeps its ViT under ``backbone.`` itself)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    state, _ = _unwrap(_as_dict(checkpoint, "this checkpoint"), split_backbone=codebase == "dinov2")
    return state


def upstream_kwargs(backbone_cfg: Mapping[str, Any], codebase: str) -> dict[str, Any]:
    """Translate an upstream backbone config (``ViTAdapter``, ``BEiTAdapter`` or ``UniPerceiverAdapter``)
    into ``ViTAdapter`` kwargs."""
    if codebase not in CODEBASES:
        raise ValueError(f"codebase must be one of {CODEBASES}, got {codebase!r}")
    cfg = dict(backbone_cfg)
    # before the translation below uses a value (depth expands window lists): bad ones are named
    check_fields(cfg, _source(codebase))
    kind = cfg.pop("type", "ViTAdapter")
    if kind not in _TYPES:
        raise ValueError(f"backbone type {kind!r} is not supported (supported: {', '.join(map(repr, _TYPES))})")
    for name in _IGNORED:
        cfg.pop(name, None)
    if kind == "BEiTAdapter":
        kwargs = _beit_kwargs(cfg, codebase)
    elif kind == "UniPerceiverAdapter":
        kwargs = uniperceiver.adapter_kwargs(cfg, codebase, _windows(cfg, cfg.get("depth", 12)))
    else:
        kwargs = _vit_kwargs(cfg)
        kwargs["vit_feature_source"] = "interactions" if codebase == "segmentation" else "final"
    if cfg:
        raise ValueError(f"unsupported upstream {kind} option(s): {sorted(cfg)}")
    return kwargs


def _vit_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Upstream's ``ViTAdapter`` options (consumed from ``cfg``)."""
    kwargs = {name: cfg.pop(name) for name in _SAME_NAME if name in cfg}
    img_size = cfg.pop("img_size", None)
    pretrain_size = kwargs.setdefault("pretrain_size", 224)
    if img_size is not None and _as_int_size(img_size) != pretrain_size:
        raise ValueError(
            f"img_size {img_size} differs from pretrain_size {pretrain_size}: upstream reshapes the "
            "position embedding to pretrain_size/16, so such a config cannot run upstream either"
        )
    if cfg.pop("residual_indices", None):
        raise ValueError("residual_indices (ViTDet-style residual blocks) are not supported")
    windows = _windows(cfg, kwargs.get("depth", 12))
    if windows:
        kwargs["window_size"] = windows
    # upstream's class defaults where they differ from ViTAdapter's
    kwargs.setdefault("num_heads", 12)
    kwargs.setdefault("layer_scale", True)
    kwargs.setdefault("deform_num_heads", 6)
    return kwargs


# upstream BEiT trunk options -> timm ``Beit`` keyword arguments
_BEIT_TRUNK = {
    "img_size": "img_size", "patch_size": "patch_size", "in_chans": "in_chans", "embed_dim": "embed_dim",
    "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias",
    "attn_drop_rate": "attn_drop_rate", "drop_path_rate": "drop_path_rate", "use_abs_pos_emb": "use_abs_pos_emb",
    "use_rel_pos_bias": "use_rel_pos_bias", "use_shared_rel_pos_bias": "use_shared_rel_pos_bias",
}
# upstream BEiTAdapter adapter options that keep their names
_BEIT_ADAPTER = ("conv_inplane", "n_points", "deform_num_heads", "deform_ratio", "with_cffn", "cffn_ratio",
                 "interaction_indexes", "add_vit_feature")
# upstream BEiT's class defaults (its configs override most of them)
_BEIT_DEFAULTS = dict(img_size=512, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                      mlp_ratio=4.0, qkv_bias=False, use_abs_pos_emb=False, use_rel_pos_bias=True)


def _beit_kwargs(cfg: dict[str, Any], codebase: str) -> dict[str, Any]:
    """Upstream's ``BEiTAdapter`` (consumed from ``cfg``): a timm ``Beit`` trunk with upstream's shape.

    The segmentation BEiT carries its cls token through every block group; the detection BEiT has
    none and attends within windows (the Beit driver turns the trunk into that layout).
    """
    trunk = dict(_BEIT_DEFAULTS)
    trunk.update({_BEIT_TRUNK[k]: cfg.pop(k) for k in list(cfg) if k in _BEIT_TRUNK})
    trunk["img_size"] = _as_int_size(trunk["img_size"])
    adapter = {k: cfg.pop(k) for k in _BEIT_ADAPTER if k in cfg}
    drop_rate = cfg.pop("drop_rate", 0.0)
    trunk.update(pos_drop_rate=drop_rate, proj_drop_rate=drop_rate)
    if cfg.pop("qk_scale", None) is not None:
        raise ValueError("qk_scale is not supported: BEiT scales attention by head_dim ** -0.5")
    init_values = cfg.pop("init_values", 0.0)
    if not init_values:
        raise ValueError(
            f"init_values {init_values!r}: BEiTAdapter needs a positive layer-scale init (its configs use 1e-6); "
            "0 would zero every block's residual branch"
        )
    pretrain_size = cfg.pop("pretrain_size", 224)
    if trunk["use_abs_pos_emb"] and (codebase == "segmentation" or _as_int_size(pretrain_size) != trunk["img_size"]):
        raise ValueError(
            "use_abs_pos_emb: upstream's BEiTAdapter reshapes the position table to pretrain_size/16 "
            "without its cls row, which only works in the detection codebase with pretrain_size == img_size"
        )
    version = cfg.pop("version", "new")
    if codebase == "segmentation":
        source = "interactions"
    elif version in ("new", "old"):
        source = "final" if version == "new" else "interactions"
    else:
        raise ValueError(f"version must be 'new' or 'old', got {version!r}")
    kwargs = dict(
        trunk="beit_base_patch16_224",
        trunk_kwargs=dict(trunk, init_values=float(init_values)),
        drop_path_rate=trunk.get("drop_path_rate", 0.0),
        init_values=float(init_values),
        **{"deform_num_heads": 6, "deform_ratio": 1.0, **adapter},
        vit_feature_source=source,
    )
    windows = _windows(cfg, trunk["depth"])
    if codebase == "detection" and not windows:
        raise ValueError("a detection BEiTAdapter without window_attn is not supported (upstream's detection BEiTs use windows)")
    if codebase == "segmentation" and windows:
        raise ValueError("window_attn: upstream's segmentation BEiT has no windowed attention")
    if windows:
        kwargs["window_size"] = windows
    return kwargs


def _windows(cfg: dict[str, Any], depth: int) -> Optional[list[Optional[int]]]:
    """Per-block windows from upstream's ``window_attn``/``window_size`` (``None``: none asked)."""
    window_attn = _per_block(cfg.pop("window_attn", False), depth, "window_attn")
    window_size = _per_block(cfg.pop("window_size", 14), depth, "window_size")
    if not all(isinstance(on, bool) for on in window_attn):
        raise ValueError(f"window_attn must be true/false, or a list of them per block, got {window_attn!r}")
    if not any(window_attn):
        return None
    return [s if on else None for on, s in zip(window_attn, window_size)]  # sizes checked with the rest


class Conversion(NamedTuple):
    """A checkpoint turned into a model's state dict, and what happened to its keys."""

    state: dict[str, torch.Tensor]  # every key of the model
    dropped: list[str]  # checkpoint keys left out: task heads, classifier parts
    initialised: list[str]  # model keys the checkpoint lacks, kept at their fresh (upstream) init


def load_checkpoint(model: ViTAdapter, checkpoint: Checkpoint) -> Conversion:
    """Load a checkpoint (path or dict, any supported layout) into ``model``, strictly."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    conversion = convert_checkpoint(checkpoint, model)
    _adapt_input_convs(model, conversion.state)
    check_state_dict(model, conversion.state)
    model.load_state_dict(conversion.state)
    return conversion


# the convolutions that read the image: the trunk's patch embedding and the spatial prior's stem
INPUT_CONVS = ("vit.patch_embed.proj.weight", "spm.stem.0.weight")


def _adapt_input_convs(model: ViTAdapter, state: dict[str, Any]) -> None:
    """RGB weights for a model of another channel count: both input convolutions adapted as timm
    adapts its models' ``first_conv`` (1 channel: the sum; more: RGB repeated and rescaled)."""
    own = model.state_dict()
    for key in INPUT_CONVS:
        weight, expected = state.get(key), own.get(key)
        if not isinstance(weight, torch.Tensor) or expected is None or weight.dim() != 4 or not weight.is_floating_point():
            continue
        if weight.shape[1] == 3 and expected.shape[1] != 3 and weight.shape[0] == expected.shape[0]:
            state[key] = adapt_input_conv(expected.shape[1], weight)


def read_checkpoint(path: Union[str, os.PathLike]) -> Mapping[Any, Any]:
    """Read a ``torch.save`` file (``.pth``, ``.pth.tar``) or an upstream ``.zip`` release around one.

    Nothing in the file runs: ``weights_only=True`` first, and files whose ``meta`` pickles other
    objects (mmcv configs, numpy scalars) are read with an unpickler that resolves only tensor-building
    globals and turns every other global into an inert placeholder (README, "Security"). A file that
    holds anything but a dict (a tensor, a list, a string) is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _is_release_archive(path):
        # a staging folder, so that a killed run's unpacked copy is removed by the next one
        with staging_folder(Path(tempfile.gettempdir()) / "vitadapter-unpacked") as folder:
            return _as_dict(_read_torch_file(_extract_checkpoint(path, folder), shown=path), path)
    return _as_dict(_read_torch_file(path, shown=path), path)


def convert_checkpoint(checkpoint: Mapping[str, Any], model: ViTAdapter) -> Conversion:
    """Any supported checkpoint layout -> a full state dict for ``model``.

    Layouts: vitadapter's own (``vit.*`` keys, as in ``model.safetensors``), upstream's (mm-style,
    ``backbone.`` prefix, heads; Uni-Perceiver's BERT names, whole backbones or upstream's converted
    encoder files) and a timm checkpoint of the trunk's family (the trunk only: the adapter keeps its
    fresh upstream initialisation).
    """
    state, dropped = _unwrap(_as_dict(checkpoint, "this checkpoint"))
    beit_state = any(".relative_position_bias_table" in k or k.endswith((".q_bias", ".v_bias")) for k in state)
    if beit_state and not isinstance(model.vit, Beit):
        raise ValueError(
            f"this is a BEiT checkpoint (relative position bias tables, q/v biases) and the model's trunk is "
            f"a {type(model.vit).__name__}: use a BEiT architecture"
        )
    if any(k.startswith("vit.") for k in state):
        return Conversion(dict(state), dropped, [])
    if uniperceiver.is_uniperceiver_state(state):
        return _uniperceiver_conversion(state, dropped, model)
    if any(k.startswith(("spm.", "level_embed", "interactions.")) for k in state):
        convert = _upstream_beit_keys if beit_state else _upstream_keys
        return Conversion(convert(state), dropped, [])
    if "patch_embed.proj.weight" in state:
        if isinstance(model.vit, Beit):
            state, gone = beit_state_for(dict(state), model.vit)
            dropped = dropped + gone
        elif isinstance(model.vit, Eva):
            state = eva_filter(state, model.vit)  # maps DINOv3/EVA release names onto timm's module
        trunk, classifier = trunk_state_from_timm(state, model.vit)
        full = {k: v for k, v in model.state_dict().items() if not k.startswith("vit.")}
        initialised = sorted(full)
        full.update({"vit." + k: v for k, v in trunk.items()})
        return Conversion(full, dropped + classifier, initialised)
    shown = ", ".join(list(state)[:5]) or "none"
    raise ValueError(f"not a ViT-Adapter, vitadapter or timm ViT checkpoint (no patch embedding or adapter: {shown})")


def _uniperceiver_conversion(state: Mapping[str, torch.Tensor], dropped: list[str], model: ViTAdapter) -> Conversion:
    """An upstream Uni-Perceiver adapter backbone, or the encoder alone (then the adapter keeps its
    fresh upstream initialisation)."""
    if not isinstance(getattr(model.vit, "norm_pre", None), torch.nn.LayerNorm) or model.vit.cls_token is not None:
        raise ValueError(
            f"this is a Uni-Perceiver checkpoint and the model's trunk is a {type(model.vit).__name__} of another "
            "kind: use a uniperceiver_adapter_* architecture"
        )
    converted, gone = uniperceiver.convert_state(state)
    if any(not k.startswith("vit.") for k in converted):
        return Conversion(converted, dropped + gone, [])
    full = {k: v for k, v in model.state_dict().items() if not k.startswith("vit.")}
    initialised = sorted(full)
    full.update(converted)
    return Conversion(full, dropped + gone, initialised)


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise a ``ValueError`` naming every missing, unexpected, mis-shaped or mistyped key, and every
    tensor holding NaN or infinite values (loading would cast integers and keep NaNs silently)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shared = sorted(set(state) & set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in shared
        if state[k].shape != expected[k].shape
    ]
    mistyped = [
        f"{k}: checkpoint {state[k].dtype} vs model {expected[k].dtype}"
        for k in shared
        if _kind(state[k]) != _kind(expected[k])
    ]
    non_finite = [k for k in shared if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
        ("dtype mismatches", mistyped),
        ("NaN or infinite values", non_finite),
    ):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise ValueError(f"checkpoint does not fit the model{_size_hint(expected, state)}; " + "; ".join(problems))


def _size_hint(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """Say which size differs, so the fix (another architecture) is obvious."""
    width, pos = "vit.patch_embed.proj.weight", "vit.pos_embed"
    if width in state and state[width].dim() == 4 and state[width].shape[0] != expected[width].shape[0]:
        theirs, ours = state[width].shape[0], expected[width].shape[0]
        return f" (a {theirs}-wide ViT, the model's is {ours} wide: use the matching architecture)"
    if pos in state and state[pos].dim() == 3 and state[pos].shape != expected[pos].shape:
        theirs, ours = _grid(state[pos].shape[1]), _grid(expected[pos].shape[1])
        return f" (a {theirs} position grid, the model's is {ours}: pretrain_size differs)"
    return ""


def _grid(cells: int) -> str:
    side = math.isqrt(cells)
    return f"{side}x{side}" if side * side == cells else f"{cells}-cell"


def _unwrap(checkpoint: Mapping[str, Any], split_backbone: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict inside a checkpoint: ``state_dict``/``model`` wrappers and ``module.`` prefixes
    go; when keys carry ``backbone.`` (and ``split_backbone``), the rest (task heads, necks) is dropped.
    Returns (state, dropped), the kept entries checked by ``_check_entry``: every checkpoint a
    vitadapter model loads passes here."""
    state = checkpoint
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    for key in state:
        if not isinstance(key, str):
            raise ValueError(f"checkpoint key {key!r} is a {type(key).__name__}, not a string")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    dropped = []
    if split_backbone and any(k.startswith("backbone.") for k in state):
        dropped = sorted(k for k in state if not k.startswith("backbone."))
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    for key, value in state.items():
        _check_entry(key, value)
    return state, dropped


# Tensors whose shapes the conversions read before the model's own shape check, by key or last key
# part, and their number of dimensions: prefix tokens and position grids (1, tokens, width), the patch
# embedding (width, channels, patch, patch), BEiT's relative position tables (rows, heads).
_RANKS = {
    "pos_embed": 3, "cls_token": 3, "dist_token": 3, "reg_token": 3, "patch_embed.proj.weight": 4,
    "relative_position_bias_table": 2,
}


def _check_entry(key: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"checkpoint entry {key!r} is not a tensor ({type(value).__name__})")
    if value.layout is not torch.strided:
        raise ValueError(f"checkpoint entry {key!r} is a {value.layout} tensor; only dense tensors load")
    rank = _RANKS.get(key, _RANKS.get(key.rsplit(".", 1)[-1]))
    if rank is not None and value.dim() != rank:
        raise ValueError(f"checkpoint entry {key!r} has shape {tuple(value.shape)}, expected {rank} dimensions")


def _as_dict(checkpoint: Any, source: Any) -> Mapping[Any, Any]:
    """What a checkpoint holds must be a dict: a string in it is content, never a path to follow."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must hold a dict of tensors; {source} holds a {type(checkpoint).__name__}")
    return checkpoint


def _kind(tensor: torch.Tensor) -> tuple[bool, bool, bool]:
    return tensor.is_floating_point(), tensor.is_complex(), tensor.dtype == torch.bool


def _upstream_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream backbone keys -> this model's keys (layer scale ``gamma1/2`` is timm's ``ls1/2.gamma``)."""
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            value = _drop_cls_slot(value)
        if key.startswith(("pos_embed", "patch_embed.", "blocks.")):
            key = "vit." + key.replace(".gamma1", ".ls1.gamma").replace(".gamma2", ".ls2.gamma")
        out[key] = value
    return out


def _upstream_beit_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream BEiTAdapter keys -> this model's: the trunk's names are timm ``Beit``'s already.
    ``relative_position_index`` is derived (and missing from released files), so it is dropped."""
    trunk = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "rel_pos_bias.")
    return {
        ("vit." + k if k.startswith(trunk) else k): v
        for k, v in state.items()
        if not k.endswith("relative_position_index")
    }


def _drop_cls_slot(pos_embed: torch.Tensor) -> torch.Tensor:
    """Upstream's grid is square and follows one cls slot, which its ViT never uses."""
    cells = pos_embed.shape[1] - 1 if pos_embed.dim() == 3 else -1
    if cells > 0 and math.isqrt(cells) ** 2 == cells:
        return pos_embed[:, 1:]
    return pos_embed


def _per_block(value: Any, depth: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * depth
    if len(values) != depth:
        raise ValueError(f"{name} lists {len(values)} entries for a depth-{depth} ViT")
    return values


def _as_int_size(size: Any) -> int:
    if isinstance(size, (list, tuple)) and len(size) == 2:
        if size[0] != size[1]:
            raise ValueError(f"non-square img_size {size} is not supported")
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"img_size must be an integer or [height, width], got {size!r}")
    return size


# ---- reading torch.save files without running code ------------------------------------------------

_CHECKPOINT_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin")
# Bounds on unpacking a release .zip (its one checkpoint is a few hundred MB to a few GB of weights,
# which deflate barely shrinks; a 3 MB archive can declare 3 GiB of zeros): the member count, the
# checkpoint's declared size, and its compression ratio once it is large enough to matter.
MAX_ARCHIVE_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 16 << 30
MAX_COMPRESSION_RATIO = 20
_ANY_RATIO_BELOW = 64 << 20
# Globals a state dict needs (tensor and parameter rebuilding, containers); both spellings of the
# builtins module because protocol-2 pickles, torch.save's default, write "__builtin__".
_SAFE_GLOBALS = frozenset({
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch.Size",
    "torch.device",
    "_codecs.encode",
    *(f"{module}.{name}" for module in ("builtins", "__builtin__") for name in ("set", "frozenset", "slice")),
})


class InertGlobal:
    """Stands in for a pickled global outside the allow-list: keeps what the pickle hands it, runs nothing."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # containers (e.g. mmcv's ConfigDict, a dict subclass) are filled item by item
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("elements", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("elements", []).extend(items)

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``_SAFE_GLOBALS`` and torch dtypes; every other global becomes an ``InertGlobal``."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or f"{module}.{name}" in _SAFE_GLOBALS:
            return super().find_class(module, name)
        return type(name, (InertGlobal,), {"qualified_name": f"{module}.{name}"})


# torch.load takes a pickle *module*; torch's own unpickler subclasses its ``Unpickler`` (adding tensor
# storage handling) and legacy files also go through its ``load``.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="vitadapter.restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
)


def _read_torch_file(path: Path, shown: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # weights_only refuses globals outside torch's allow-list, such as upstream's mmcv/numpy
            # ``meta``; the restricted unpickler reads them as inert placeholders instead.
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception as e:  # a damaged file fails in any of pickle's, zip's or torch's error types
        # Not chained, and only the error's first line: torch's messages advise re-running with
        # weights_only=False, which would run code from the file.
        line = next(iter(str(e).strip().splitlines()), "")
        reason = type(e).__name__ + ("" if "weights_only" in line or not line else f": {line[:200]}")
        raise ValueError(f"could not read {shown}: it is truncated, corrupt or not a checkpoint ({reason})") from None


def _is_release_archive(path: Path) -> bool:
    """A zip that is not itself a torch.save file (those are zips holding a ``data.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return not any(name.endswith("data.pkl") for name in archive.namelist())
    except zipfile.BadZipFile as e:
        raise ValueError(f"could not read {path}: the zip archive is corrupt ({e})") from e


def _extract_checkpoint(archive_path: Path, folder: Path) -> Path:
    """The one checkpoint file inside an upstream ``.zip`` release, extracted into ``folder``.

    Nothing else is extracted, and that file only within bounds (``_check_unpacked_size``); zipfile
    stops reading a member at the size the archive declares for it and checks its CRC.
    """
    try:
        with zipfile.ZipFile(archive_path) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_ARCHIVE_MEMBERS:
                raise ValueError(
                    f"refusing to unpack {archive_path}: it lists {len(infos)} members, more than the "
                    f"{MAX_ARCHIVE_MEMBERS} a release archive is allowed"
                )
            members = [m for m in infos if m.filename.endswith(_CHECKPOINT_SUFFIXES)]
            if len(members) != 1:
                names = ", ".join(m.filename for m in infos[:5]) or "nothing"
                kinds = "/".join(_CHECKPOINT_SUFFIXES)
                raise ValueError(f"{archive_path} should hold exactly one checkpoint ({kinds}), it holds {names}")
            _check_unpacked_size(archive_path, members[0], folder)
            # only the base name is used, so member paths cannot point outside ``folder``
            target = folder / Path(members[0].filename).name
            with archive.open(members[0]) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"could not unpack {archive_path}: the zip archive is truncated or corrupt ({e})") from e
    return target


def _check_unpacked_size(archive_path: Path, member: zipfile.ZipInfo, folder: Path) -> None:
    size, packed = member.file_size, member.compress_size
    free = shutil.disk_usage(folder).free
    if size > MAX_UNPACKED_BYTES:
        problem = f"more than vitadapter's ceiling of {MAX_UNPACKED_BYTES} bytes"
    elif size > _ANY_RATIO_BELOW and size > MAX_COMPRESSION_RATIO * packed:
        problem = f"{size // max(packed, 1)} times its compressed size, while weights barely compress"
    elif size > free:
        problem = f"more than the {free} bytes free in {folder}"
    else:
        return
    raise ValueError(f"refusing to unpack {archive_path}: {member.filename} would take {size} bytes, {problem}")
