"""Metrics: semantic segmentation with mmseg's definitions, COCO detection with pycocotools as mmdet
runs it.

Segmentation (``SegmentationMetric``, mmseg's ``mean_iou``/``intersect_and_union``):

Over a whole dataset, per class: intersection I (pixels predicted and labelled as the class), union
U = predicted + labelled - I, counted on labelled pixels only (the ignore index is left out, and so
is whatever the model predicted there). IoU = I / U and Acc = I / labelled; a class that is neither
labelled nor predicted anywhere has no IoU (NaN), a class that is never labelled has no Acc, and the
means (mIoU, mAcc) skip NaNs. aAcc = all correct pixels / all labelled pixels.

Detection (``detection_results``, ``coco_evaluate``; pycocotools, the ``coco`` extra): mmdet 2.x's
``CocoDataset.evaluate`` — COCOeval over every annotated image and the model's categories, IoU 0.50
to 0.95 in steps of 0.05, at most 100 / 300 / 1000 detections per image for the recall rows; mask AP
without the results' boxes, so small/medium/large go by mask area. AP is the precision averaged
over 101 recall points and the ten IoU thresholds (AP50 and AP75 at one threshold; APs, APm, APl
over objects under 32², up to 96² and over 96² pixels).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data.folder import IGNORE_INDEX


@dataclass(frozen=True)
class SegmentationScores:
    """Per-class ``iou`` and ``acc`` (NaN where undefined) and the dataset summaries, all in [0, 1]."""

    iou: np.ndarray
    acc: np.ndarray
    miou: float
    macc: float
    aacc: float


class SegmentationMetric:
    """Accumulates per-class areas over ``update(pred, label)`` calls; ``compute()`` gives the scores.

    ``pred`` and ``label`` are integer maps of one shape (NumPy arrays or CPU tensors); ``label``
    holds classes ``0..num_classes-1`` or ``ignore_index``.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersection = np.zeros(num_classes, dtype=np.int64)
        self.pred_area = np.zeros(num_classes, dtype=np.int64)
        self.label_area = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: Any, label: Any) -> None:
        pred, label = np.asarray(pred), np.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
        labelled = label != self.ignore_index
        pred, label = pred[labelled].astype(np.int64), label[labelled].astype(np.int64)
        for name, values in (("label", label), ("prediction", pred)):
            if values.size and (values.min() < 0 or values.max() >= self.num_classes):
                bad = values[(values < 0) | (values >= self.num_classes)][0]
                raise ValueError(
                    f"{name} holds class {bad}, outside 0..{self.num_classes - 1} (ignore index {self.ignore_index}): "
                    "a dataset of other classes than the model's, or labels not reduced (ADE20K's 0 = other)?"
                )
        n = self.num_classes
        self.intersection += np.bincount(label[pred == label], minlength=n)
        self.pred_area += np.bincount(pred, minlength=n)
        self.label_area += np.bincount(label, minlength=n)

    @property
    def union(self) -> np.ndarray:
        return self.pred_area + self.label_area - self.intersection

    def compute(self) -> SegmentationScores:
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.intersection / self.union
            acc = self.intersection / self.label_area
            aacc = self.intersection.sum() / self.label_area.sum()
        return SegmentationScores(iou, acc, _nanmean(iou), _nanmean(acc), float(aacc))


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():  # all NaN (nothing labelled yet): NaN, without a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


# ---- COCO detection -----------------------------------------------------------------------------------------

# mmdet 2.x's ``proposal_nums``: COCOeval's maxDets there, so the recall rows read AR@100/300/1000
COCO_MAX_DETS = (100, 300, 1000)
COCO_IOU_TYPES = ("bbox", "segm")


@dataclass(frozen=True)
class CocoScores:
    """COCOeval's 12 ``stats`` of one ``iou_type`` ("bbox" or "segm"; -1 where nothing was annotated):
    AP, AP50, AP75, APs, APm, APl, then the recalls; and its ``summary``, the lines ``COCOeval.summarize()`` prints (what mmdet's logs show)."""

    iou_type: str
    stats: np.ndarray
    summary: str

    @property
    def copypaste(self) -> str:
        """mmdet's ``{iou_type}_mAP_copypaste``: the six APs to three decimals."""
        return " ".join(f"{value:.3f}" for value in self.stats[:6])


def _pycocotools() -> Any:
    try:
        import pycocotools.coco
        import pycocotools.cocoeval
        import pycocotools.mask
    except ImportError as e:
        raise ImportError("COCO evaluation needs pycocotools: pip install 'vitadapter[coco]'") from e
    return pycocotools


def detection_results(detections: Mapping[str, Any], image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One image's detections (a detector's ``boxes`` x1y1x2y2, ``scores``, ``labels`` and optional
    ``masks`` N x H x W, arrays or CPU tensors) as COCO results entries: ``image_id``, ``category_id``
    (``category_ids[label]``), ``bbox`` [x, y, w, h], ``score`` and, with masks, ``segmentation`` (an
    RLE whose ``counts`` are text)."""
    boxes = np.asarray(detections["boxes"], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(detections["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(detections["labels"]).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"detections hold {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(category_ids)):
        raise ValueError(f"label {int(labels.max() if labels.max() >= len(category_ids) else labels.min())} is outside "
                         f"the {len(category_ids)} category ids given")
    masks = detections.get("masks")
    rles: list[Any] = [None] * len(boxes)
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim != 3 or len(masks) != len(boxes):
            raise ValueError(f"masks must be N x H x W for the {len(boxes)} detections, got shape {masks.shape}")
        if len(masks):
            # pycocotools encodes column-major H x W x N uint8
            rles = _pycocotools().mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    results = []
    for (x1, y1, x2, y2), score, label, rle in zip(boxes.tolist(), scores.tolist(), labels.tolist(), rles):
        entry = {"image_id": image_id, "category_id": int(category_ids[label]), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        if rle is not None:
            entry["segmentation"] = {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode("ascii")}
        results.append(entry)
    return results


def coco_ground_truth(annotations: Mapping[str, Any]) -> Any:
    """A pycocotools ``COCO`` of an instances dict (``images``, ``annotations``, ``categories``), built
    without its console chatter."""
    coco = _pycocotools().coco.COCO()
    coco.dataset = dict(annotations)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_results(ground_truth: Any, results: Sequence[Mapping[str, Any]], source: str = "results") -> None:
    """Refuse results entries that cannot be scored against ``ground_truth`` (a ``COCO``): missing
    fields, or image and category ids it does not have (results for another dataset)."""
    needed = ("image_id", "category_id", "score")
    for i, entry in enumerate(results):
        if not isinstance(entry, Mapping) or any(k not in entry for k in needed) or not ("bbox" in entry or "segmentation" in entry):
            raise ValueError(f"{source}: entry {i} is not a COCO result ({{image_id, category_id, bbox and/or segmentation, score}})")
    for field, known, what in (("image_id", ground_truth.imgs, "image"), ("category_id", ground_truth.cats, "category")):
        unknown = sorted({entry[field] for entry in results} - set(known), key=str)
        if unknown:
            shown = ", ".join(map(str, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise ValueError(f"{source} are for another dataset: {what} id(s) {shown} are not in the annotations "
                             f"({len(known)} {what}s)")


def coco_evaluate(
    ground_truth: Any,
    results: Sequence[Mapping[str, Any]],
    iou_type: str,
    category_ids: Sequence[int] | None = None,
    image_ids: Sequence[int] | None = None,
) -> CocoScores:
    """Box ("bbox") or mask ("segm") AP of COCO ``results`` against ``ground_truth`` (a ``COCO``,
    ``coco_ground_truth``) as mmdet 2.x computes it: over the ``image_ids`` and ``category_ids``
    (default: all the annotations have), mask AP without the results' boxes."""
    if iou_type not in COCO_IOU_TYPES:
        raise ValueError(f"iou_type must be one of {COCO_IOU_TYPES}, got {iou_type!r}")
    check_results(ground_truth, results)
    drop = "bbox" if iou_type == "segm" else "segmentation"
    entries = [{k: v for k, v in entry.items() if k != drop} for entry in results]
    if iou_type == "segm" and any("segmentation" not in entry for entry in entries):
        raise ValueError("results without masks (segmentation) give no mask AP")
    tools = _pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):
        if entries:
            detected = ground_truth.loadRes(entries)
        else:  # loadRes cannot take an empty list: nothing detected scores 0 wherever something is annotated
            detected = coco_ground_truth(dict(images=ground_truth.dataset["images"], categories=ground_truth.dataset["categories"], annotations=[]))
        evaluation = tools.cocoeval.COCOeval(ground_truth, detected, iou_type)
        evaluation.params.imgIds = list(image_ids) if image_ids is not None else sorted(ground_truth.getImgIds())
        evaluation.params.catIds = list(category_ids) if category_ids is not None else sorted(ground_truth.getCatIds())
        evaluation.params.maxDets = list(COCO_MAX_DETS)
        evaluation.evaluate()
        evaluation.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluation.summarize()
    return CocoScores(iou_type, np.asarray(evaluation.stats, dtype=np.float64), summary.getvalue().rstrip("\n"))
