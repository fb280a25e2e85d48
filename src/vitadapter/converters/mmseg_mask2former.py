"""Upstream's ``Mask2FormerHead`` config (mmseg 0.x / mmcv 1.x dicts) -> ``Mask2FormerHead`` kwargs.

``mask2former_head_kwargs(decode_head_cfg, train_cfg)`` reads the ``decode_head`` dict as upstream's
configs write it (``type="Mask2FormerHead"``, ``pixel_decoder``, ``transformer_decoder``,
``positional_encoding``, the three losses) and the segmentor's ``train_cfg`` (matching costs, point
sampling; also read from ``decode_head_cfg["train_cfg"]``, where upstream's segmentor puts it).
Every setting is either mapped, checked to have the one value the port computes, or listed as
having no effect on the computed function (initialisation, checkpointing, kernel tiling, layout);
anything else raises ``ValueError`` naming the setting.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

_MISSING = object()


class _Section:
    """Reads one config dict; ``finish()`` refuses the keys nobody read."""

    def __init__(self, cfg: Any, where: str):
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(cfg).__name__}")
        self.cfg, self.where, self.read = dict(cfg), where, set()

    def get(self, key: str, default: Any = _MISSING) -> Any:
        self.read.add(key)
        if key in self.cfg:
            return self.cfg[key]
        if default is _MISSING:
            raise ValueError(f"{self.where}.{key} is required")
        return default

    def section(self, key: str, default: Any = _MISSING) -> "_Section":
        return _Section(self.get(key, default), f"{self.where}.{key}")

    def require(self, key: str, allowed: Any, default: Any = _MISSING) -> Any:
        """The value must equal ``allowed`` (or be one of a tuple of them)."""
        value = self.get(key, default)
        options = allowed if isinstance(allowed, tuple) else (allowed,)
        if not any(_same(value, option) for option in options):
            raise ValueError(
                f"{self.where}.{key}={value!r} is not supported "
                f"(the port computes {' or '.join(repr(o) for o in options)})"
            )
        return value

    def ignore(self, *keys: str) -> None:
        self.read.update(keys)

    def finish(self) -> None:
        extra = sorted(set(self.cfg) - self.read)
        if extra:
            raise ValueError(f"{self.where}: unsupported setting(s) {', '.join(extra)}")


def _same(value: Any, option: Any) -> bool:
    if isinstance(option, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isclose(value, option, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(option, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(value) == len(option) and all(_same(v, o) for v, o in zip(value, option))
    return value == option and type(value) is type(option) or (value is None and option is None)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    return float(value)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return value


def _relu(cfg: Any, where: str) -> None:
    act = _Section(cfg, where)
    act.require("type", "ReLU")
    act.ignore("inplace")
    act.finish()


def _one_attention(cfgs: Any, count: int, where: str) -> _Section:
    """attn_cfgs is one dict, or a list of ``count`` equal dicts."""
    if isinstance(cfgs, (list, tuple)):
        if len(cfgs) != count or any(dict(c) != dict(cfgs[0]) for c in cfgs):
            raise ValueError(f"{where} must be one dict or {count} equal dicts")
        cfgs = cfgs[0]
    return _Section(cfgs, where)


def _ffn(layer: _Section, dim: int, decoder_layer: bool) -> int:
    """The FFN's hidden width, after mmcv's rule that the layer-level ``feedforward_channels``,
    ``ffn_dropout`` and ``ffn_num_fcs`` override ``ffn_cfgs`` (DetrTransformerDecoderLayer always
    passes the last two, as 0.0 and 2 by default)."""
    ffn = layer.section("ffn_cfgs", {})
    ffn.require("type", "FFN", "FFN")
    embed = ffn.get("embed_dims", dim)
    if embed != dim:
        raise ValueError(f"{ffn.where}.embed_dims={embed!r} must equal the layer width {dim}")
    hidden = ffn.get("feedforward_channels", 1024)
    drop, fcs = ffn.get("ffn_drop", 0.0), ffn.get("num_fcs", 2)
    if "feedforward_channels" in layer.cfg:
        hidden = layer.get("feedforward_channels")
    if "ffn_dropout" in layer.cfg or decoder_layer:
        drop = layer.get("ffn_dropout", 0.0)
    if "ffn_num_fcs" in layer.cfg or decoder_layer:
        fcs = layer.get("ffn_num_fcs", 2)
    if fcs != 2:
        raise ValueError(f"{layer.where}: an FFN of {fcs!r} linear layers is not supported (the port has 2)")
    if _number(drop, f"{layer.where} FFN dropout") != 0:
        raise ValueError(f"{layer.where}: FFN dropout {drop!r} is not supported (the port has none)")
    _relu(ffn.get("act_cfg", {"type": "ReLU"}), f"{ffn.where}.act_cfg")
    ffn.require("add_identity", True, True)
    ffn.require("dropout_layer", (None, {"type": "Dropout", "drop_prob": 0.0}), None)
    ffn.ignore("with_cp", "init_cfg", "feedforward_channels", "ffn_drop", "num_fcs")
    ffn.finish()
    # the layer's own act_cfg and batch_first have no effect on the FFN or the layout here
    layer.ignore("act_cfg", "batch_first", "init_cfg")
    return _positive_int(hidden, f"{layer.where} feedforward_channels")


def _sine_encoding(cfg: Any, where: str, dim: int) -> None:
    pe = _Section(cfg, where)
    pe.require("type", "SinePositionalEncoding")
    num_feats = pe.get("num_feats")
    if num_feats * 2 != dim:
        raise ValueError(f"{where}.num_feats={num_feats!r} must be half the width {dim}")
    pe.require("normalize", True)
    pe.require("temperature", (10000, 10000.0), 10000)
    pe.require("scale", 2 * math.pi, 2 * math.pi)
    pe.require("eps", 1e-6, 1e-6)
    pe.require("offset", (0, 0.0), 0.0)
    pe.ignore("init_cfg")
    pe.finish()


def _pixel_decoder(cfg: Any, dim: int, num_levels: int) -> dict[str, Any]:
    pd = _Section(cfg, "pixel_decoder")
    pd.require("type", "MSDeformAttnPixelDecoder")
    # in/feat/out channels are overwritten by the head; strides cancel out of the reference points
    pd.ignore("in_channels", "feat_channels", "out_channels", "strides", "init_cfg")
    pd.require("num_outs", num_levels, 3)
    norm = pd.section("norm_cfg", {"type": "GN", "num_groups": 32})
    norm.require("type", "GN")
    num_groups = _positive_int(norm.get("num_groups"), f"{norm.where}.num_groups")
    norm.require("requires_grad", True, True)
    norm.require("eps", 1e-5, 1e-5)
    norm.finish()
    _relu(pd.get("act_cfg", {"type": "ReLU"}), "pixel_decoder.act_cfg")

    enc = pd.section("encoder")
    enc.require("type", "DetrTransformerEncoder")
    layers = _positive_int(enc.get("num_layers"), f"{enc.where}.num_layers")
    enc.ignore("init_cfg", "post_norm_cfg")  # the final norm only exists for pre-norm layers
    layer = enc.section("transformerlayers")
    layer.require("type", "BaseTransformerLayer")
    layer.require("operation_order", (("self_attn", "norm", "ffn", "norm"), ["self_attn", "norm", "ffn", "norm"]))
    _layer_norm(layer, "norm_cfg")
    attn = _one_attention(layer.get("attn_cfgs"), 1, f"{layer.where}.attn_cfgs")
    attn.require("type", "MultiScaleDeformableAttention")
    attn.require("embed_dims", dim)
    heads = _positive_int(attn.get("num_heads", 8), f"{attn.where}.num_heads")
    attn.require("num_levels", num_levels, 4)
    points = _positive_int(attn.get("num_points", 4), f"{attn.where}.num_points")
    attn.require("dropout", (0.0, 0), 0.1)
    attn.require("norm_cfg", None, None)
    attn.require("value_proj_ratio", (1.0, 1), 1.0)
    attn.ignore("im2col_step", "batch_first", "init_cfg")
    attn.finish()
    ffn = _ffn(layer, dim, decoder_layer=False)
    layer.finish()
    enc.finish()
    _sine_encoding(pd.get("positional_encoding"), "pixel_decoder.positional_encoding", dim)
    pd.finish()
    return dict(num_groups=num_groups, encoder_layers=layers, encoder_heads=heads, encoder_points=points,
                encoder_ffn_channels=ffn)


def _layer_norm(parent: _Section, key: str) -> None:
    """A norm setting that must be LayerNorm (mmcv's default where the config is silent)."""
    norm = parent.section(key, {"type": "LN"})
    norm.require("type", "LN")
    norm.finish()


def _transformer_decoder(cfg: Any, dim: int) -> dict[str, Any]:
    td = _Section(cfg, "transformer_decoder")
    td.require("type", "DetrTransformerDecoder")
    layers = _positive_int(td.get("num_layers"), f"{td.where}.num_layers")
    td.ignore("return_intermediate", "init_cfg")  # the head calls the layers itself
    _layer_norm(td, "post_norm_cfg")
    layer = td.section("transformerlayers")
    layer.require("type", "DetrTransformerDecoderLayer")
    layer.require("operation_order", (
        ("cross_attn", "norm", "self_attn", "norm", "ffn", "norm"),
        ["cross_attn", "norm", "self_attn", "norm", "ffn", "norm"],
    ))
    _layer_norm(layer, "norm_cfg")
    attn = _one_attention(layer.get("attn_cfgs"), 2, f"{layer.where}.attn_cfgs")
    attn.require("type", "MultiheadAttention")
    attn.require("embed_dims", dim)
    heads = _positive_int(attn.get("num_heads"), f"{attn.where}.num_heads")
    attn.require("attn_drop", (0.0, 0), 0.0)
    attn.require("proj_drop", (0.0, 0), 0.0)
    attn.require("dropout_layer", (None, {"type": "Dropout", "drop_prob": 0.0}), {"type": "Dropout", "drop_prob": 0.0})
    attn.ignore("batch_first", "init_cfg")
    attn.finish()
    ffn = _ffn(layer, dim, decoder_layer=True)
    layer.finish()
    td.finish()
    return dict(decoder_layers=layers, decoder_heads=heads, decoder_ffn_channels=ffn)


def _losses(head: _Section, num_classes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "loss_cls" in head.cfg:
        cls = head.section("loss_cls")
        cls.require("type", "CrossEntropyLoss")
        cls.require("use_sigmoid", False, False)
        cls.require("use_mask", False, False)
        cls.require("reduction", "mean", "mean")
        cls.ignore("avg_non_ignore", "loss_name")  # the class loss is averaged by its class weights
        out["loss_class_weight"] = _number(cls.get("loss_weight", 1.0), f"{cls.where}.loss_weight")
        weights = cls.get("class_weight", None)
        if weights is not None:
            if not isinstance(weights, (list, tuple)) or len(weights) != num_classes + 1:
                raise ValueError(f"{cls.where}.class_weight must list {num_classes + 1} weights (classes + no object)")
            if any(_number(w, f"{cls.where}.class_weight") != 1.0 for w in weights[:-1]):
                raise ValueError(f"{cls.where}.class_weight: per-class weights other than 1.0 are not supported "
                                 "(only the last, the no-object weight, may differ)")
            out["no_object_weight"] = _number(weights[-1], f"{cls.where}.class_weight")
        else:
            out["no_object_weight"] = 1.0
        cls.finish()
    if "loss_mask" in head.cfg:
        mask = head.section("loss_mask")
        mask.require("type", "CrossEntropyLoss")
        mask.require("use_sigmoid", True)
        mask.require("reduction", "mean", "mean")
        mask.require("class_weight", None, None)
        mask.ignore("avg_non_ignore", "loss_name", "use_mask")
        out["loss_mask_weight"] = _number(mask.get("loss_weight", 1.0), f"{mask.where}.loss_weight")
        mask.finish()
    if "loss_dice" in head.cfg:
        dice = head.section("loss_dice")
        dice.require("type", "DiceLoss")
        dice.require("use_sigmoid", True, True)
        dice.require("activate", True, True)
        dice.require("naive_dice", True, False)
        dice.require("reduction", "mean", "mean")
        dice.ignore("loss_name")
        out["loss_dice_weight"] = _number(dice.get("loss_weight", 1.0), f"{dice.where}.loss_weight")
        out["dice_eps"] = _number(dice.get("eps", 1e-3), f"{dice.where}.eps")
        dice.finish()
    return out


def _train_cfg(cfg: Any) -> dict[str, Any]:
    train = _Section(cfg, "train_cfg")
    out = dict(
        num_points=_positive_int(train.get("num_points", 12544), "train_cfg.num_points"),
        oversample_ratio=_number(train.get("oversample_ratio", 3.0), "train_cfg.oversample_ratio"),
        importance_sample_ratio=_number(train.get("importance_sample_ratio", 0.75), "train_cfg.importance_sample_ratio"),
    )
    sampler = train.section("sampler", {"type": "MaskPseudoSampler"})
    sampler.require("type", "MaskPseudoSampler")
    sampler.finish()
    assigner = train.section("assigner")
    assigner.require("type", "MaskHungarianAssigner")
    cls = assigner.section("cls_cost", {"type": "ClassificationCost", "weight": 1.0})
    cls.require("type", "ClassificationCost")
    out["match_class_weight"] = _number(cls.get("weight", 1.0), f"{cls.where}.weight")
    cls.finish()
    mask = assigner.section("mask_cost", {"type": "CrossEntropyLossCost", "weight": 1.0})
    mask.require("type", "CrossEntropyLossCost")
    mask.require("use_sigmoid", True, True)
    out["match_mask_weight"] = _number(mask.get("weight", 1.0), f"{mask.where}.weight")
    mask.finish()
    dice = assigner.section("dice_cost", {"type": "DiceCost", "weight": 1.0})
    dice.require("type", "DiceCost")
    dice.require("pred_act", True, False)
    out["match_dice_weight"] = _number(dice.get("weight", 1.0), f"{dice.where}.weight")
    out["match_dice_eps"] = _number(dice.get("eps", 1e-3), f"{dice.where}.eps")
    dice.finish()
    assigner.finish()
    train.finish()
    return out


def mask2former_head_kwargs(decode_head_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any] | None = None
                            ) -> dict[str, Any]:
    """``Mask2FormerHead`` kwargs for an upstream ``decode_head`` config (and the model's ``train_cfg``)."""
    head = _Section(decode_head_cfg, "decode_head")
    head.require("type", "Mask2FormerHead")
    in_channels = head.get("in_channels")
    if not isinstance(in_channels, (list, tuple)) or not in_channels:
        raise ValueError(f"decode_head.in_channels must be a list of channel counts, got {in_channels!r}")
    in_channels = [_positive_int(c, "decode_head.in_channels") for c in in_channels]
    dim = _positive_int(head.get("feat_channels"), "decode_head.feat_channels")
    out_channels = _positive_int(head.get("out_channels"), "decode_head.out_channels")
    counts = [head.get("num_things_classes", 80), head.get("num_stuff_classes", 53)]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f"decode_head.num_things_classes and num_stuff_classes must be integers from 0 with a "
                         f"positive sum, got {counts[0]!r} and {counts[1]!r}")
    num_classes = sum(counts)
    num_levels = _positive_int(head.get("num_transformer_feat_level", 3), "decode_head.num_transformer_feat_level")
    kwargs: dict[str, Any] = dict(
        in_channels=in_channels, feat_channels=dim, out_channels=out_channels,
        num_queries=_positive_int(head.get("num_queries", 100), "decode_head.num_queries"),
        num_classes=num_classes, num_levels=num_levels,
    )
    in_index = head.get("in_index", list(range(len(in_channels))))
    if isinstance(in_index, int) or len(in_index) != len(in_channels):
        raise ValueError(f"decode_head.in_index={in_index!r} must list one input per in_channels entry")
    if list(in_index) != list(range(len(in_channels))):
        kwargs["in_index"] = list(in_index)
    head.require("enforce_decoder_input_project", False, False)
    head.require("align_corners", False, False)
    head.require("input_transform", "multiple_select", "multiple_select")
    # BaseDecodeHead's own pieces that Mask2Former never uses (conv_seg is None), and initialisation
    head.ignore("init_cfg", "channels", "dropout_ratio", "conv_cfg", "norm_cfg", "act_cfg", "loss_decode",
                "sampler", "ignore_index", "test_cfg")
    kwargs.update(_pixel_decoder(head.get("pixel_decoder"), dim, num_levels))
    kwargs.update(_transformer_decoder(head.get("transformer_decoder"), dim))
    _sine_encoding(head.get("positional_encoding"), "decode_head.positional_encoding", dim)
    kwargs.update(_losses(head, num_classes))
    head.ignore("loss_cls", "loss_mask", "loss_dice")
    own_train = head.get("train_cfg", None)
    if train_cfg is not None and own_train is not None and dict(train_cfg) != dict(own_train):
        raise ValueError("train_cfg given twice (argument and decode_head.train_cfg) with different values")
    train_cfg = train_cfg if train_cfg is not None else own_train
    if train_cfg is not None:
        kwargs.update(_train_cfg(train_cfg))
    head.finish()
    return kwargs
