"""What creating any registered task model (a segmentor, a detector) involves besides its heads:
timm's pretrained cfg, the backbone built by timm, the arguments that rebuild the model, and the
whole release or ``save_pretrained`` folder loaded over it."""
from __future__ import annotations

from typing import Any, Callable, Optional

import timm
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

from ..weights.fetch import fetch_weights
from ..weights.read import Checkpoint, read_weights

# (backbone, number of classes, the resolved pretrained cfg, class names or None) -> the task model
ModelFactory = Callable[[nn.Module, int, Any, Optional[tuple[str, ...]]], nn.Module]
# (model, checkpoint, keep_classifier) -> the checkpoint keys left out
CheckpointLoader = Callable[[nn.Module, Checkpoint, bool], list[str]]


def create_task_model(
    variant: str,
    backbone: str,
    pretrained: bool,
    kwargs: dict[str, Any],
    make: ModelFactory,
    load_checkpoint: CheckpointLoader,
    head_args: dict[str, Any],
    default_classes: int,
    kind: str,
    output: str,
) -> nn.Module:
    """The ``variant`` task model: ``make`` puts its heads on the ``backbone`` architecture.

    ``pretrained`` loads the tag's whole release (or the cfg's ``state_dict``); with another
    ``num_classes`` the class-specific layers stay fresh (for fine-tuning on other classes). A
    ``save_pretrained`` folder (``local-dir:`` / ``hf-hub:``) loads strictly: every key of the file
    and of the model must match, unless another ``num_classes`` is asked for.
    ``pretrained_backbone=True`` starts the backbone from its default tag instead (the ImageNet trunk
    upstream trains from). Other keyword arguments go to the backbone. ``head_args``: the
    architecture's own arguments, recorded in ``model_args`` (read once ``make`` has run).
    ``kind`` ("segmentor") and ``output`` ("class logits") name the model and what it maps an image
    to, for the error ``features_only`` gets.
    """
    if kwargs.pop("features_only", False):
        raise ValueError(
            f"{variant} is a task model (image -> {output}) without a features_only form: its feature "
            f"backbone is {kind}.backbone, or create {backbone!r} with features_only=True"
        )
    cache_dir, timeout = kwargs.pop("cache_dir", None), kwargs.pop("timeout", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    cfg = resolve_pretrained_cfg(variant, kwargs.pop("pretrained_cfg", None), overlay)
    pretrained_backbone = kwargs.pop("pretrained_backbone", False)

    def build(num_classes: int = default_classes, **backbone_kwargs: Any) -> nn.Module:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        backbone_kwargs.pop("global_pool", None)
        net = timm.create_model(backbone, pretrained=pretrained_backbone, **backbone_kwargs)
        names = cfg.label_names if cfg.label_names and len(cfg.label_names) == num_classes else None
        model = make(net, num_classes, cfg, names)
        # the backbone's own arguments (every one, so that its registered defaults may change) rebuild it
        backbone_args = {k: v for k, v in net.model_args.items() if k != "num_classes"}
        model.model_args = dict(backbone_args, num_classes=num_classes, **head_args)
        if pretrained:
            checkpoint, source = cfg.state_dict, "the given state_dict"
            if checkpoint is None:
                source = fetch_weights(cfg.to_dict(), cache_dir, timeout)
                checkpoint = read_weights(source)
            same_classes = num_classes == cfg.num_classes
            dropped = load_checkpoint(model, checkpoint, same_classes)
            if dropped and same_classes and cfg.source in ("local-dir", "hf-hub"):
                raise ValueError(f"{source} holds keys this {variant} does not have: {', '.join(dropped[:10])}")
        return model

    return build_model_with_cfg(build, variant, False, pretrained_cfg=cfg, **kwargs)


def prefixed_group_rule(rule: Any, prefix: str) -> Any:
    """A timm group rule (a regex, or a list of (regex, suffix) pairs) for parameters under ``prefix``."""
    if isinstance(rule, str):
        return "^" + prefix.replace(".", r"\.") + rule.removeprefix("^")
    return [(prefixed_group_rule(pattern, prefix), suffix) for pattern, suffix in rule]
