"""Detecting objects and scoring detectors: the overlay, COCO results entries, COCO AP as mmdet runs
pycocotools, and the ``vitadapter detect`` / ``vitadapter eval-det`` commands."""
import importlib.resources
import json
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn

import vitadapter
from vitadapter.cli import main
from vitadapter.data import coco
from vitadapter.metrics import coco_evaluate, coco_ground_truth, detection_results
from vitadapter.predict import predict_detections
from vitadapter.visualize import _contrasting, class_palette, detection_overlay

CAT = coco.CLASSES.index("cat")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No weights in any cache and no downloads: zoo names fall back to random weights."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("vitadapter: error: ") and err.count("\n") == 1, err
    assert all(f in err for f in fragments), err


# ---- the overlay ---------------------------------------------------------------------------------------------


def square(h, w, x, y, side):
    mask = np.zeros((h, w), bool)
    mask[y:y + side, x:x + side] = True
    return mask


@pytest.mark.parametrize("shade", [0, 255])
def test_overlay_tints_masks_outlines_boxes_and_tags_in_a_contrasting_text(shade):
    """On a black and on a white photo: each mask blended half with its colour, each box outlined in
    it, each tag filled with it and written in black or white, whichever contrasts more; the caption
    in a band above the photo."""
    h, w = 120, 160
    image = Image.new("RGB", (w, h), (shade,) * 3)
    boxes = np.array([[10, 40, 60, 90], [90, 50, 150, 110]], float)
    masks = np.stack([square(h, w, 20, 50, 30), square(h, w, 100, 60, 40)])
    picture = detection_overlay(image, boxes, np.array([0.9, 0.6]), np.array([CAT, 0]), masks, coco.CLASSES, caption="two things")
    pixels = np.asarray(picture).astype(int)
    band = picture.height - h
    assert picture.width == w and band > 0
    photo = pixels[band:]
    colours = class_palette(2)
    for i, (x, y) in enumerate([(35, 65), (120, 80)]):  # inside each mask, away from text
        expected = np.round(np.array([shade] * 3) * 0.5 + np.array(colours[i]) * 0.5)
        assert np.array_equal(photo[y, x], expected)
    assert tuple(photo[80, 10]) == colours[0] and tuple(photo[100, 150]) == colours[1]  # left / right box edges
    for i, (x1, y1) in enumerate(boxes[:, :2].astype(int)):
        tag = photo[max(0, y1 - 16):y1, x1 + 2:x1 + 40].reshape(-1, 3)
        text = _contrasting(colours[i])
        near_text = np.abs(tag - np.array(text)).max(-1) < 64  # anti-aliased glyphs
        assert (tag == colours[i]).all(-1).sum() > 50 and near_text.sum() > 20, i
    assert not (pixels[:band] < 128).all(-1).all()  # the caption's black text on white


# ---- COCO results and COCO AP --------------------------------------------------------------------------------

# (side, shift) of one object per area range: small, medium, large; IoU = (side - shift) / (side + shift)
OBJECTS = [(20, 2), (50, 10), (120, 6)]
# the better the IoU, the higher the score: at each threshold the matches are the best-scored
SCORES = {20: 0.8, 50: 0.7, 120: 0.9}
SIZES = [(200, 300), (240, 320)]  # (h, w) of the two images


def synthetic_coco(root):
    """Two images, each with a small, medium and large square 'cat', in COCO's layout with all 80
    categories; returns the annotations dict and per image (h, w) its objects' (x, y, side)."""
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations, placed = [], [], {}
    for i, (h, w) in enumerate(SIZES):
        Image.new("RGB", (w, h), (40 * i, 90, 160)).save(root / "val" / f"{i + 1:012d}.png")
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.png", "height": h, "width": w})
        spots = [(10, 10), (60, 10), (150, 40)]
        placed[(h, w)] = []
        for (side, _), (x, y) in zip(OBJECTS, spots):
            rle = mask_utils.encode(np.asfortranarray(square(h, w, x, y, side).astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": coco.CATEGORY_IDS[CAT],
                                "bbox": [x, y, side, side], "area": side * side, "iscrowd": 0,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
            placed[(h, w)].append((x, y, side))
    categories = [{"id": k, "name": name} for k, name in zip(coco.CATEGORY_IDS, coco.CLASSES)]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return data, placed


def predictions(placed, shifted):
    """Per image size, the detections of each object moved right by its shift (or not at all)."""
    out = {}
    for (h, w), objects in placed.items():
        shifts = [shift if shifted else 0 for _, shift in OBJECTS]
        boxes = torch.tensor([[x + d, y, x + d + s, y + s] for (x, y, s), d in zip(objects, shifts)], dtype=torch.float32)
        masks = torch.from_numpy(np.stack([square(h, w, x + d, y, s) for (x, y, s), d in zip(objects, shifts)]))
        out[(h, w)] = {"boxes": boxes, "scores": torch.tensor([SCORES[s] for _, _, s in objects]),
                       "labels": torch.full((3,), CAT), "masks": masks}
    return out


def expected_ap():
    """COCO AP by hand: per IoU threshold t, the objects whose IoU reaches t are all matched and
    scored above the others, so precision is 1 up to recall k/n and nothing after; COCOeval samples
    precision at 101 recall points."""
    ious = {side: (side - shift) / (side + shift) for side, shift in OBJECTS}
    thresholds = np.linspace(0.5, 0.95, 10)
    recall_points = np.linspace(0, 1, 101)

    def ap(sides, t):
        k = sum(ious[s] >= t for s in sides)
        return np.sum(recall_points <= k / len(sides) + 1e-12) / 101 if k else 0.0

    every = [s for s, _ in OBJECTS]
    return [np.mean([ap(every, t) for t in thresholds]), ap(every, 0.5), ap(every, 0.75),
            *[np.mean([ap([s], t) for t in thresholds]) for s, _ in OBJECTS]]


class StubDetector(nn.Module):
    """Answers each image with the detections stored for its size, as a vitadapter detector would."""

    def __init__(self, by_size, names=coco.CLASSES):
        super().__init__()
        self.by_size, self.class_names, self.num_classes = by_size, names, len(names)
        self.roi_head = SimpleNamespace(score_thr=0.05)
        self.test_scale = (1333, 800)

    def forward(self, images):
        return [self.by_size[tuple(image.shape[-2:])] for image in images]


def test_perfect_and_shifted_detections_score_the_ap_worked_out_by_hand(tmp_path):
    data, placed = synthetic_coco(tmp_path)
    truth = coco_ground_truth(data)
    results = {shifted: [entry for (h, w), found in predictions(placed, shifted).items()
                         for entry in detection_results(found, SIZES.index((h, w)) + 1, coco.CATEGORY_IDS)]
               for shifted in (False, True)}
    for iou_type in ("bbox", "segm"):
        assert np.array_equal(coco_evaluate(truth, results[False], iou_type).stats[:6], np.ones(6)), iou_type
        np.testing.assert_allclose(coco_evaluate(truth, results[True], iou_type).stats[:6], expected_ap(), atol=1e-12)
    assert 0.6 < expected_ap()[0] < 0.7 and expected_ap()[3:] == pytest.approx([0.7, 0.4, 0.9])


def test_eval_det_prints_mmdets_table_for_known_detections(tmp_path, capsys, monkeypatch):
    """The command end to end with a stub detector: images read from the folder, labels mapped to
    COCO's category ids by name, boxes and masks scored; then the same as a results JSON."""
    data, placed = synthetic_coco(tmp_path)
    argv = ["eval-det", "--data", str(tmp_path / "val")]
    for shifted, expected in ((False, [1.0] * 6), (True, expected_ap())):
        stub = StubDetector(predictions(placed, shifted))
        monkeypatch.setattr("vitadapter.cli.eval_det.detector_model", lambda args, device, fall_back: (stub, "stub"))
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "2 of 2 images" in out and "instances_val.json" in out
        copypaste = " ".join(f"{v:.3f}" for v in expected)
        assert f"bbox_mAP_copypaste: {copypaste}" in out and f"segm_mAP_copypaste: {copypaste}" in out
        first = re.search(r"^ Average Precision  \(AP\) @\[ IoU=0.50:0.95 \| area=   all \| maxDets=100 \] = (\S+)$", out, re.M)
        assert first.group(1) == f"{expected[0]:.3f}" and "maxDets=1000" in out  # mmdet's AR@100/300/1000
    results = [entry for (h, w), found in predictions(placed, True).items()
               for entry in detection_results(found, SIZES.index((h, w)) + 1, coco.CATEGORY_IDS)]
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main([*argv, "--results", str(tmp_path / "results.json"), "--limit", "2"]) == 0
    assert f"segm_mAP_copypaste: {copypaste}" in capsys.readouterr().out


@pytest.mark.parametrize("break_it, fragments", [
    (lambda d, r: r[0].update(image_id=99), ["are for another dataset", "image id(s) 99 are not in the annotations"]),
    (lambda d, r: r[1].update(category_id=12), ["are for another dataset", "category id(s) 12"]),
    (lambda d, r: d["images"].append({"id": 5, "file_name": "gone.jpg"}), ["names 1 image(s) missing", "gone.jpg"]),
    (lambda d, r: d.update(categories=d["categories"][:3]), ["is for another dataset", "no category named"]),
    (lambda d, r: d.pop("categories"), ["not a COCO instances file"]),
])
def test_eval_det_errors_are_one_line(break_it, fragments, tmp_path, capsys, monkeypatch):
    data, placed = synthetic_coco(tmp_path)
    results = [entry for (h, w), found in predictions(placed, False).items()
               for entry in detection_results(found, SIZES.index((h, w)) + 1, coco.CATEGORY_IDS)]
    break_it(data, results)
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    (tmp_path / "results.json").write_text(json.dumps(results))
    monkeypatch.setattr("vitadapter.cli.eval_det.detector_model",
                        lambda args, device, fall_back: (StubDetector(predictions(placed, False)), "stub"))
    uses_model = "category named" in fragments[-1]
    argv = ["eval-det", "--data", str(tmp_path / "val")] + ([] if uses_model else ["--results", str(tmp_path / "results.json")])
    assert main(argv) == 2
    one_line_error(capsys, *fragments)


# ---- detect --------------------------------------------------------------------------------------------------


def test_detect_the_bundled_image_with_a_random_detector(tmp_path, capsys, offline):
    """The zoo's T detector on random weights at a small test scale: the overlay has the photo's
    width, says so in red, and the results JSON holds exactly the model's detections, in COCO's
    format and ids, loadable by pycocotools."""
    out = tmp_path / "out"
    assert main(["detect", "--model", "mask_rcnn_vit_adapter_t", "--size", "128", "--score-thr", "0.07",
                 "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "HF_HUB_OFFLINE" in captured.err and "running on random weights" in captured.err
    assert "detected objects in 1 of 1 image(s) at test scale 213 x 128" in captured.out
    with importlib.resources.as_file(importlib.resources.files("vitadapter") / "assets" / "chelsea.png") as path:
        photo = Image.open(path).convert("RGB")
    with Image.open(out / "chelsea.overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.width == photo.width and overlay.height > photo.height
        top = np.asarray(overlay)[:20].astype(int)
        assert (top[..., 0] - top[..., 1:].max(-1) > 80).sum() > 20  # the red alert
    results = json.loads((out / "detections.json").read_text())

    torch.manual_seed(0)
    model = vitadapter.create_model("mask_rcnn_vit_adapter_t").eval()
    model.test_scale, model.roi_head.score_thr = (213, 128), 0.05
    with torch.inference_mode():
        found = predict_detections(model, photo)
    assert 0 < len(results) == len(found["scores"]) <= 100
    for entry, box, score, label, mask in zip(results, found["boxes"], found["scores"], found["labels"], found["masks"]):
        assert entry["image_id"] == 1 and entry["category_id"] == coco.CATEGORY_IDS[label]
        x1, y1, x2, y2 = box.tolist()
        assert entry["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1]) and entry["score"] == pytest.approx(float(score))
        assert np.array_equal(mask_utils.decode(entry["segmentation"]), mask.numpy().astype(np.uint8))
    truth = COCO()
    truth.dataset = {"images": [{"id": 1, "height": photo.height, "width": photo.width}], "annotations": [],
                     "categories": [{"id": k, "name": n} for k, n in zip(coco.CATEGORY_IDS, coco.CLASSES)]}
    truth.createIndex()
    assert len(truth.loadRes(str(out / "detections.json")).getAnnIds()) == len(results)


def test_detect_a_folder_skips_the_unreadable_file(tmp_path, capsys, monkeypatch):
    """Known detections on a dark and a light image of a folder, a file that only claims to be an
    image between them: both overlays and all their detections written, the junk reported, exit 1."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (160, 120), (15, 15, 25)).save(folder / "7.png")
    Image.new("RGB", (150, 110), (245, 245, 235)).save(folder / "42.jpg")
    (folder / "9.png").write_bytes(b"not a picture")
    by_size = {}
    for h, w in ((120, 160), (110, 150)):
        by_size[(h, w)] = {"boxes": torch.tensor([[10.0, 30, 70, 90], [80, 20, 140, 100]]), "scores": torch.tensor([0.95, 0.2]),
                           "labels": torch.tensor([CAT, 0]),
                           "masks": torch.from_numpy(np.stack([square(h, w, 15, 35, 50), square(h, w, 85, 25, 50)]))}
    stub = StubDetector(by_size)
    monkeypatch.setattr("vitadapter.cli.detect.detector_model", lambda args, device, fall_back: (stub, "stub"))
    out = tmp_path / "out"
    assert main(["detect", str(folder), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "9.png is not an image file" in captured.err
    assert "detected objects in 2 of 3 image(s)" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["42.overlay.png", "7.overlay.png", "detections.json"]
    results = json.loads((out / "detections.json").read_text())
    assert [(e["image_id"], e["category_id"]) for e in results] == [(42, 17), (42, 1), (7, 17), (7, 1)]
    for name, (h, w) in (("7", (120, 160)), ("42", (110, 150))):
        with Image.open(out / f"{name}.overlay.png") as overlay:
            expected = detection_overlay(Image.open(folder / f"{name}.{'png' if name == '7' else 'jpg'}").convert("RGB"),
                                         by_size[(h, w)]["boxes"][:1].numpy(), np.array([0.95]), np.array([CAT]),
                                         by_size[(h, w)]["masks"][:1].numpy(), coco.CLASSES,
                                         caption="1 of 2 detections scoring at least 0.3 drawn: mask, box, class and score")
            assert np.array_equal(np.asarray(overlay), np.asarray(expected))  # only the 0.95 one, no alert
    assert stub.roi_head.score_thr == 0.05  # the default 0.3 leaves the model's own threshold alone


@pytest.mark.parametrize("argv, fragments", [
    (["detect", "--model", "upernet_vit_adapter_t"], ["is a segmentor", "vitadapter segment --model upernet_vit_adapter_t",
                                                      "detect takes the mask_rcnn_*"]),
    (["eval-det", "--data", ".", "--model", "vit_adapter_t"], ["--model vit_adapter_t is a backbone", "vitadapter features"]),
    (["segment", "--model", "mask_rcnn_vit_adapter_t"], ["is a detector", "vitadapter detect --model mask_rcnn_vit_adapter_t"]),
    (["eval-seg", ".", "--model", "cascade_mask_rcnn_vit_adapter_s.coco"], ["is a detector"]),
    (["features", "--model", "mask_rcnn_vit_adapter_s"], ["is a detector", "features takes the vit_adapter_*"]),
    (["train-seg", ".", "--model", "mask_rcnn_vit_adapter_t", "--out", "run"], ["is a detector; train-seg trains a segmentor"]),
    (["detect", "--model", "mask_rcnn_vit_adapter_t.ade"], ["has no tag 'ade'", "coco"]),
    (["eval-det", "--data", "nowhere"], ["--data nowhere: no such folder"]),
    (["eval-det", "--data", "."], ["no such file", "instances_"]),
    (["eval-det", "--data", ".", "--results", "r.json", "--model", "mask_rcnn_vit_adapter_t"], ["leave out --model"]),
])
def test_wrong_kind_of_model_and_bad_options_are_one_line(argv, fragments, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    one_line_error(capsys, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_score_threshold_and_size_are_checked_by_argparse(capsys):
    for argv in (["detect", "--score-thr", "1.5"], ["detect", "--size", "16"], ["eval-det", "--data", ".", "--size", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "expected a score between 0 and 1" in capsys.readouterr().err


def test_usage_errors_of_detect_and_eval_det_answer_without_torch():
    script = textwrap.dedent("""
        import contextlib, io, sys
        from vitadapter.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for argv in (["detect", "--model", "vit_adapter_t"], ["eval-det", "--data", "nowhere"],
                         ["eval-det", "--data", ".", "--model", "upernet_vit_adapter_t"], ["detect", "--help"]):
                try:
                    assert main(argv) == 2, argv
                except SystemExit:
                    pass
        heavy = sorted({"torch", "timm", "numpy", "PIL.Image", "pycocotools"} & set(sys.modules))
        assert not heavy, heavy
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_eval_det_runs_a_detector_checkpoint_of_other_classes(tmp_path, capsys):
    """A whole 3-class T detector saved with torch.save, scored end to end: built for the file's
    class count, its unnamed classes matched to the annotations' 3 categories in id order."""
    data, _ = synthetic_coco(tmp_path)
    data["categories"] = [{"id": k, "name": name} for k, name in ((5, "a"), (9, "b"), (17, "c"))]
    for entry in data["annotations"]:
        entry["category_id"] = 9
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    torch.manual_seed(0)
    model = vitadapter.create_model("mask_rcnn_vit_adapter_t", num_classes=3)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "three.pth")
    argv = ["eval-det", "--data", str(tmp_path / "val"), "--weights", str(tmp_path / "three.pth"), "--size", "64", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"weights: {tmp_path / 'three.pth'}" in out and "test scale 107 x 64" in out
    for iou_type in ("bbox", "segm"):
        line = re.search(rf"^{iou_type}_mAP_copypaste: (.*)$", out, re.M).group(1).split()
        assert len(line) == 6 and all(0 <= float(v) <= 1 for v in line)
