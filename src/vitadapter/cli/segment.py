"""``vitadapter segment``: label every pixel of an image (or each image of a folder) with a segmentor and
write a label map and an overlay PNG for each."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..weights.staging import save_image
from ._common import UsageError, one_line, subcommand, torch_device
from ._images import check_images, image_files, output_stems, read_image, refuse_replacing_inputs
from ._segmentors import (
    add_segmentor_options, check_segmentor_options, class_names, predict_labels, scales_and_flip, segmentor_model,
    weights_line,
)

SEGMENT_FOLDER = "vitadapter_segment"


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "segment", "label every pixel of an image (or a folder of images) with a segmentor: label map and overlay PNGs")
    p.add_argument("image", nargs="?", help="image file or folder of images (default: the bundled chelsea.png)")
    add_segmentor_options(p)
    p.add_argument("--out", metavar="FOLDER", help=f"folder for NAME.label.png and NAME.overlay.png (default: {SEGMENT_FOLDER}/)")
    p.set_defaults(run=segment)


def segment(args: argparse.Namespace) -> int:
    images = image_files(args.image)
    out = Path(args.out or SEGMENT_FOLDER)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: names the folder for the label maps and overlays, and it is a file")
    check_segmentor_options(args)
    check_images(args.image, images)
    stems = output_stems([Path(name) for name, _ in images])
    refuse_replacing_inputs([out / f"{stem}.{kind}.png" for stem in stems for kind in ("label", "overlay")], images, out)
    device = torch_device(args.device)
    model, weights = segmentor_model(args, device, fall_back=True)

    from huggingface_hub.utils import tqdm  # lazy: startup time

    from ..visualize import class_palette, label_image, segmentation_overlay

    names = class_names(model)
    palette = class_palette(model.num_classes, model.class_names)
    alert = "" if weights else "RANDOM WEIGHTS: untrained model, the labels mean nothing"
    ratios, flip = scales_and_flip(args.aug)
    out.mkdir(parents=True, exist_ok=True)
    skipped = 0
    with tqdm(total=len(images), unit="image", desc="segment", disable=None) as bar:
        for (name, source), stem in zip(images, stems):
            try:
                image = read_image(name, source)
            except ValueError as e:  # reported; the other images go on
                bar.write(f"vitadapter: skipped {one_line(e)}", file=sys.stderr)
                skipped += 1
                bar.update()
                continue
            labels = predict_labels(model, image, args, ratios, flip, device).numpy()
            label_path, overlay_path = out / f"{stem}.label.png", out / f"{stem}.overlay.png"
            save_image(label_image(labels, palette), label_path)
            save_image(segmentation_overlay(image, labels, palette, names, alert=alert), overlay_path)
            bar.write(f"wrote {label_path} and {overlay_path}")
            bar.update()
    done = len(images) - skipped
    print(f"segmented {done} of {len(images)} image(s) into {out} ({weights_line(weights)})")
    if skipped:
        print(f"vitadapter: {skipped} file(s) could not be read (listed above)", file=sys.stderr)
    return 1 if skipped else 0
