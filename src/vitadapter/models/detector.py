"""The detector: a backbone that gives a feature pyramid, mmdet's two-stage heads (neck, RPN, RoI
heads), and upstream's test pipeline around them (resize to 1333 x 800, normalise, pad, rescale back)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg
from torch import nn

from ..converters.mmdet import detector_heads_kwargs
from ..data import coco
from ..detection import AugTest, TwoStageDetectorHeads
from ..detection.training import DetectorTraining, detector_losses
from ..predict import DETECTION_SCALE, check_detection_image, detection_batch, padded_detection_size
from .checkpoints import load_detector_checkpoint
from .task_model import create_task_model, prefixed_group_rule

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


class Detector(TwoStageDetectorHeads):
    """``backbone`` (image -> list of NCHW maps, strides 4-32) + mmdet's ``neck``, ``rpn_head`` and
    ``roi_head`` (``TwoStageDetectorHeads`` arguments; ``converters.mmdet.detector_heads_kwargs``
    makes them from upstream's config). State-dict keys are mmdet's: ``backbone.*`` (vitadapter's
    backbone names), ``neck.*``, ``rpn_head.*``, ``roi_head.*``.

    ``detector(images)``: a (B, 3, H, W) batch or a list of (3, H, W) images of any sizes, RGB
    values 0..255, through upstream's test pipeline (``vitadapter.predict.detection_batch``: fit
    ``test_scale``, normalise with ``mean``/``std`` in timm's 0..1 units, pad to 32; images batch
    together only where their padded sizes agree, so each result is the image's own). Returns per
    image {"boxes" (N, 4) x1y1x2y2 in that image's pixels, "scores" (N,), "labels" (N,) 0-based
    indices into ``class_names``, "masks" (N, H, W) bool}, best score first, as torchvision's
    detectors do. ``detect`` and ``detect_from_pyramid`` are the same from an already prepared
    batch or from a backbone pyramid (mmdet's ``simple_test(rescale=True)``). Put the detector in
    eval mode first: the cascade's box heads have BatchNorm.

    ``detect_aug``: the same under a multi-scale flip test, ``aug_test`` by default (upstream's for
    its HTC++ releases, else None).

    ``model_args``: for a registered detector, the keyword arguments that rebuild it through its
    architecture; None for one assembled otherwise.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: Mapping[str, Any],
        rpn_head: Mapping[str, Any],
        roi_head: Mapping[str, Any],
        class_names: Optional[Sequence[str]] = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        test_scale: tuple[int, int] = DETECTION_SCALE,
        aug_test: Optional[AugTest] = None,
    ):
        super().__init__(neck, rpn_head, roi_head)
        self.backbone = backbone
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        self.class_names = tuple(class_names) if class_names is not None else None
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"mean and std must be 3 values each (std positive), got {tuple(mean)} and {tuple(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.test_scale = tuple(test_scale)
        self.aug_test = aug_test
        self.model_args: Optional[dict[str, Any]] = None

    def forward(self, images: Images) -> list[dict[str, torch.Tensor]]:  # type: ignore[override]
        images = _image_list(images)
        # Padding joins the computation (global and deformable attention see it), and upstream
        # evaluates one image at a time: only images of one padded size share a batch.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            check_detection_image(image, f"images[{i}]")
            groups.setdefault(padded_detection_size(*image.shape[-2:], self.test_scale), []).append(i)
        parameter = next(self.parameters())
        results: list[dict[str, torch.Tensor]] = [{} for _ in images]
        for indices in groups.values():
            batch, image_sizes, original_sizes = detection_batch(
                [images[i] for i in indices], self.mean, self.std, self.test_scale, parameter.device
            )
            for i, result in zip(indices, self.detect(batch.to(parameter.dtype), image_sizes, original_sizes)):
                results[i] = result
        return results

    def detect_aug(self, images: Images, aug: Optional[AugTest] = None) -> list[dict[str, torch.Tensor]]:
        """``detector(images)`` under a multi-scale flip test: ``aug``, by default the detector's
        ``aug_test`` (for HTC++ upstream's, from its ``_ms`` configs). Each image runs once per view
        (every scale, mirrored too), one view at a time; see ``detection.test_time_aug`` for how the
        views' detections merge."""
        aug = self.aug_test if aug is None else aug
        if not isinstance(aug, AugTest):
            raise ValueError("aug: this detector has no multi-scale test of upstream's (its HTC++ releases have one); "
                             f"pass a vitadapter.detection.AugTest, got {aug!r}")
        parameter = next(self.parameters())
        results = []
        for i, image in enumerate(_image_list(images)):
            check_detection_image(image, f"images[{i}]")
            pyramids, sizes, flipped = [], [], []
            for scale, flip, _ in aug.views():
                batch, (size,), (original,) = detection_batch([image], self.mean, self.std, scale, parameter.device)
                if flip:
                    # mmdet mirrors the resized image, then pads it on the right
                    batch[..., : size[0], : size[1]] = batch[..., : size[0], : size[1]].flip(-1)
                pyramids.append(self.backbone(batch.to(parameter.dtype)))
                sizes.append(size)
                flipped.append(flip)
            results.append(self.detect_aug_from_pyramids(pyramids, sizes, flipped, original, aug))
        return results

    def detect(
        self,
        images: torch.Tensor,
        image_sizes: Sequence[Sequence[int]],
        original_sizes: Sequence[Sequence[int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Detections of an already normalised and padded (B, 3, H, W) batch: ``image_sizes`` = each
        image's (h, w) inside the batch (mmdet's ``img_shape``), ``original_sizes`` = the (h, w) to
        report boxes and masks in (``ori_shape``); the scale factors are their per-axis ratios."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a normalised, padded (B, 3, H, W) batch, got {shape}")
        if images.shape[0] == 0:
            return self.detect_from_pyramid([], image_sizes, original_sizes)
        return self.detect_from_pyramid(self.backbone(images), image_sizes, original_sizes)

    def loss(
        self,
        images: torch.Tensor,
        image_sizes: Sequence[Sequence[int]],
        targets: Sequence[Mapping[str, torch.Tensor]],
        training: Optional[DetectorTraining] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, torch.Tensor]:
        """Training losses (mmdet's ``forward_train``) of a normalised, padded (B, 3, H, W) batch: the
        named terms of ``detection.training.detector_losses`` (``loss_rpn_cls``, ``loss_rpn_bbox``,
        ``loss_cls``, ``loss_bbox``, ``loss_mask``; ``s{k}.`` per cascade stage), whose sum is the loss.
        ``image_sizes`` and ``targets`` as there; ``training`` defaults to upstream's recipe for these
        heads; ``generator`` drives the samplers (default: torch's global RNG)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a normalised, padded (B, 3, H, W) batch, got {shape}")
        return detector_losses(self, self.backbone(images), image_sizes, targets, training, generator)

    def dense_forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The part of the computation fixed by the image size (backbone, neck, RPN maps): what the
        catalog counts FLOPs of; the RoI heads' cost depends on how many proposals survive."""
        return self.rpn_head(self.neck(self.backbone(images)))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise lr decay: the backbone's groups with its names prefixed; the
        adapter, neck and heads (unmatched) join the last group."""
        return {group: prefixed_group_rule(rule, "backbone.") for group, rule in self.backbone.group_matcher(coarse).items()}

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in inner}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def _image_list(images: Images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a (B, 3, H, W) batch or a list of (3, H, W) images, got shape {tuple(images.shape)}")
        return list(images.unbind(0))
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a (B, 3, H, W) tensor or a list of (3, H, W) tensors, got {type(images).__name__}")
    return list(images)


# ---- registered detectors: COCO releases and their pretrained cfgs -----------------------------------

COCO = dict(num_classes=80, label_names=coco.CLASSES)
# upstream's test scale, padded to 32: the largest batch a COCO image becomes (catalog FLOPs, describe)
_TEST_INPUT = (3, 800, 1344)


def coco_release(backbone_tag: str, **kwargs: Any) -> dict[str, Any]:
    """The whole detector of the release file a backbone tag already points at (one file, one entry):
    its url, notes, normalisation; COCO's classes."""
    cfg = get_pretrained_cfg(backbone_tag).to_dict()
    keep = ("url", "origin_url", "notes", "mean", "std", "license")
    return dict({k: cfg[k] for k in keep if cfg.get(k) is not None}, **COCO, input_size=_TEST_INPUT, **kwargs)


# (backbone width, number of classes) -> upstream's mmdet ``model`` dict without its backbone
HeadsConfig = Callable[[int, int], Mapping[str, Any]]


def create_detector(
    variant: str, backbone: str, pretrained: bool, kwargs: dict[str, Any], heads: HeadsConfig, head_args: dict[str, Any],
    test_scale: tuple[int, int] = DETECTION_SCALE, aug_test: Optional[AugTest] = None,
) -> Detector:
    """A registered detector: the ``backbone`` architecture and the heads of upstream's mmdet config
    ``heads`` gives for its width and class count, at upstream's COCO ``test_scale`` (and its
    multi-scale flip test ``aug_test`` where upstream has one); loading and the other arguments as
    ``task_model.create_task_model`` says (the class-specific layers: classifiers and the
    class-specific box and mask regressors)."""

    def make(net: nn.Module, num_classes: int, cfg: Any, names: Optional[tuple[str, ...]]) -> Detector:
        heads_kwargs = detector_heads_kwargs(heads(net.feature_info[0]["num_chs"], num_classes))
        return Detector(net, **heads_kwargs, class_names=names, mean=cfg.mean, std=cfg.std,
                        test_scale=test_scale, aug_test=aug_test)

    return create_task_model(variant, backbone, pretrained, kwargs, make, load_detector_checkpoint, head_args,
                             default_classes=80, kind="detector", output="detections")
