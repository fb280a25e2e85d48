"""``vitadapter eval-det``: a detector's COCO box AP and mask AP (pycocotools, as mmdet 2.x evaluates)
on a folder of images and their instances JSON, or the AP of a results JSON already written."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _json
from ._common import UsageError, first_few, positive_int, subcommand, torch_device
from ._detectors import add_detector_options, check_detector_options, class_names, detector_model, scale_text, weights_line

if TYPE_CHECKING:
    import torch


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "eval-det", "COCO box and mask AP of a detector on a folder of images and their instances JSON")
    p.add_argument("--data", required=True, metavar="FOLDER", help="folder of the images the annotations name (e.g. coco/val2017)")
    p.add_argument("--ann", metavar="FILE",
                   help="COCO instances JSON (default: FOLDER/../annotations/instances_FOLDERNAME.json, COCO's layout)")
    add_detector_options(p)
    p.add_argument("--results", metavar="FILE",
                   help="score this COCO results JSON (e.g. detect's detections.json) instead of running a model")
    p.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N annotated images only")
    p.set_defaults(run=eval_det)


def eval_det(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("pycocotools") is None:
        raise UsageError("eval-det scores with pycocotools, which is not installed: pip install 'vitadapter[coco]'")
    if args.results is not None:
        given = [option for option, value in (("--model", args.model), ("--weights", args.weights), ("--size", args.size),
                                              ("--aug", args.aug)) if value]
        if given:
            raise UsageError(f"--results scores detections already made: leave out {', '.join(given)}")
        if not Path(args.results).is_file():
            raise UsageError(f"--results {args.results}: no such file")
    else:
        check_detector_options(args)
    data = Path(args.data)
    if not data.is_dir():
        raise UsageError(f"--data {args.data}: no such folder (the folder of the images the annotations name)")
    ann = Path(args.ann) if args.ann else data.parent / "annotations" / f"instances_{data.resolve().name}.json"
    if not ann.is_file():
        raise UsageError(f"--ann {ann}: no such file" + ("" if args.ann else " (COCO's layout; --ann names another)"))
    annotations = _read_annotations(ann)

    from huggingface_hub.utils import tqdm  # lazy: startup time

    from ..metrics import check_results, coco_evaluate, coco_ground_truth

    ground_truth = coco_ground_truth(annotations)
    images = sorted(ground_truth.imgs.values(), key=lambda image: image["id"])[: args.limit]
    image_ids = [image["id"] for image in images]
    missing = [image["file_name"] for image in images if not (data / image["file_name"]).is_file()]
    if missing:
        raise ValueError(f"--ann {ann} names {len(missing)} image(s) missing from {data}: {first_few(missing)} "
                         "(annotations of another folder?)")
    if args.results is not None:
        results = _json.loads(Path(args.results).read_text(), f"--results {args.results}")
        if not isinstance(results, list):
            raise ValueError(f"--results {args.results}: expected a COCO results list, got a JSON {type(results).__name__}")
        check_results(ground_truth, results, f"--results {args.results}")
        categories = None
        print(f"results: {args.results}")
    else:
        device = torch_device(args.device)
        model, weights = detector_model(args, device, fall_back=False)
        categories = _category_ids(model, annotations["categories"], ann)
        results = []
        with tqdm(total=len(images), unit="image", desc="eval-det", disable=None) as bar:
            for image in images:
                results += _detect(model, data / image["file_name"], image["id"], categories, args.aug)
                bar.update()
        print(f"model:   {args.model} ({weights_line(weights)}), {scale_text(model, args)}")
    print(f"data:    {len(images)} of {len(ground_truth.imgs)} images in {data}, annotations {ann}")
    masks = bool(results) and all("segmentation" in entry for entry in results)
    for iou_type in ("bbox", "segm") if masks or not results else ("bbox",):
        scores = coco_evaluate(ground_truth, results, iou_type, categories, image_ids)
        print(f"\nEvaluating {iou_type}...")
        print(scores.summary)
        print(f"{iou_type}_mAP_copypaste: {scores.copypaste}")
    return 0


def _read_annotations(path: Path) -> dict[str, Any]:
    """A COCO instances JSON, checked to hold what the evaluation reads."""
    annotations = _json.loads(path.read_text(), f"--ann {path}")
    if not isinstance(annotations, dict) or any(not isinstance(annotations.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError(f"--ann {path}: not a COCO instances file (a JSON object with images, annotations and categories lists)")
    for field, keys in (("images", ("id", "file_name")), ("annotations", ("id", "image_id", "category_id", "bbox", "area")),
                        ("categories", ("id", "name"))):
        bad = next((i for i, entry in enumerate(annotations[field]) if not isinstance(entry, dict) or any(k not in entry for k in keys)), None)
        if bad is not None:
            raise ValueError(f"--ann {path}: {field}[{bad}] lacks one of {', '.join(keys)}")
    return annotations


def _category_ids(model: "torch.nn.Module", categories: list[dict[str, Any]], ann: Path) -> list[int]:
    """The annotations' category id of each of the model's labels: by class name (as mmdet's
    ``CocoDataset`` maps them), or in id order for a model without names and as many categories."""
    names = class_names(model)
    if model.class_names is None:
        if len(categories) != len(names):
            raise ValueError(f"--ann {ann} has {len(categories)} categories and the model {len(names)} unnamed classes: "
                             "annotations of another dataset?")
        return sorted(category["id"] for category in categories)
    by_name = {category["name"]: category["id"] for category in categories}
    lacking = [name for name in names if name not in by_name]
    if lacking:
        raise ValueError(f"--ann {ann} is for another dataset: it has no category named {first_few(lacking)} "
                         f"({len(lacking)} of the model's {len(names)} classes)")
    return [by_name[name] for name in names]


def _detect(model: "torch.nn.Module", path: Path, image_id: int, categories: list[int], aug: bool) -> list[dict[str, Any]]:
    import torch  # lazy: startup time

    from ..data.images import read_rgb
    from ..metrics import detection_results
    from ..predict import predict_detections

    with open(path, "rb") as f:
        image = read_rgb(f, str(path))
    with torch.inference_mode():
        found = predict_detections(model, image, aug)
    return detection_results({k: v.numpy() for k, v in found.items()}, image_id, categories)
