"""``vitadapter detect``: find the objects in an image (or each image of a folder) with a detector; an
overlay PNG per image and one COCO-format results JSON for them all."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..weights.staging import save_image, write_atomically
from ._common import UsageError, one_line, subcommand, torch_device
from ._detectors import (
    add_detector_options, category_ids, check_detector_options, class_names, detector_model, scale_text, weights_line,
)
from ._images import check_images, image_files, output_stems, read_image, refuse_replacing_inputs

DETECT_FOLDER = "vitadapter_detect"
RESULTS = "detections.json"
# mmdet's show_result threshold
DEFAULT_SCORE_THR = 0.3


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "detect", "find objects in an image (or a folder of images) with a detector: overlay PNGs and "
                                  "a COCO results JSON")
    p.add_argument("image", nargs="?", help="image file or folder of images (default: the bundled chelsea.png)")
    add_detector_options(p)
    p.add_argument("--score-thr", type=score_option, default=DEFAULT_SCORE_THR, metavar="T",
                   help=f"draw the detections scoring at least T (default: {DEFAULT_SCORE_THR}); {RESULTS} holds every "
                        "detection the model gives (its own threshold, 0.05 for upstream's, or T where lower)")
    p.add_argument("--out", metavar="FOLDER",
                   help=f"folder for NAME.overlay.png and {RESULTS} (default: {DETECT_FOLDER}/)")
    p.set_defaults(run=detect)


def score_option(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a score between 0 and 1, got {text!r}")
    return value


def detect(args: argparse.Namespace) -> int:
    images = image_files(args.image)
    out = Path(args.out or DETECT_FOLDER)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: names the folder for the overlays and {RESULTS}, and it is a file")
    check_detector_options(args)
    check_images(args.image, images)
    paths = [Path(name) for name, _ in images]
    stems = output_stems(paths)
    refuse_replacing_inputs([out / f"{stem}.overlay.png" for stem in stems] + [out / RESULTS], images, out)
    ids = image_ids(paths)
    device = torch_device(args.device)
    model, weights = detector_model(args, device, fall_back=True)
    # the picture needs every detection scoring T, also under the model's own threshold
    model.roi_head.score_thr = min(model.roi_head.score_thr, args.score_thr)

    import torch  # lazy: startup time
    from huggingface_hub.utils import tqdm

    from ..metrics import detection_results
    from ..predict import predict_detections
    from ..visualize import detection_overlay

    names, categories = class_names(model), category_ids(model)
    alert = "" if weights else "RANDOM WEIGHTS: untrained model, the detections mean nothing"
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    skipped = 0
    with tqdm(total=len(images), unit="image", desc="detect", disable=None) as bar:
        for (name, source), stem, image_id in zip(images, stems, ids):
            try:
                image = read_image(name, source)
            except ValueError as e:  # reported; the other images go on
                bar.write(f"vitadapter: skipped {one_line(e)}", file=sys.stderr)
                skipped += 1
                bar.update()
                continue
            with torch.inference_mode():
                found = {k: v.numpy() for k, v in predict_detections(model, image, args.aug).items()}
            results += detection_results(found, image_id, categories)
            shown = found["scores"] >= args.score_thr
            caption = f"{int(shown.sum())} of {len(shown)} detections scoring at least {args.score_thr:g} drawn: mask, box, class and score"
            picture = detection_overlay(image, *(found[k][shown] for k in ("boxes", "scores", "labels", "masks")), names,
                                        caption=caption, alert=alert)
            overlay_path = out / f"{stem}.overlay.png"
            save_image(picture, overlay_path)
            bar.write(f"wrote {overlay_path}: {int(shown.sum())} detection(s) drawn, {len(shown)} in {RESULTS} (image id {image_id})")
            bar.update()
    results_path = out / RESULTS
    write_atomically(results_path, lambda staging: staging.write_text(json.dumps(results)))
    done = len(images) - skipped
    print(f"detected objects in {done} of {len(images)} image(s) at {scale_text(model, args)}; wrote {results_path} "
          f"({len(results)} detections, COCO results format) and the overlays into {out} ({weights_line(weights)})")
    if skipped:
        print(f"vitadapter: {skipped} file(s) could not be read (listed above)", file=sys.stderr)
    return 1 if skipped else 0


def image_ids(paths: list[Path]) -> list[int]:
    """COCO image ids: the numbers the files are named by where every name is one (COCO's own
    ``000000397133.jpg``), else each image's position in the run, from 1."""
    if all(p.stem.isdigit() for p in paths) and len({int(p.stem) for p in paths}) == len(paths):
        return [int(p.stem) for p in paths]
    return list(range(1, len(paths) + 1))
