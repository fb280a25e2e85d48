"""Upstream's multi-scale flip test of HTC++ (HybridTaskCascadeAug): the merge rule against a plain
re-derivation on random predictions, flip equivariance and the single-scale case on the HTC fixture's
detector, and the settings of upstream's _ms configs."""
import json

import numpy as np
import pytest
import torch

import detection_reference as ref
import vitadapter
from conftest import FIXTURES
from vitadapter._meta import meta_device
from vitadapter.detection import AugTest
from vitadapter.detection.test_time_aug import merge_mask_probabilities, merge_views

META = json.loads((FIXTURES / "htc.json").read_text())
CONFIGS = json.loads((FIXTURES / "htc_zoo_configs.json").read_text())["configs"]


def reference_merge(boxes, scores, image_sizes, flipped, original, aug):
    """HybridTaskCascadeAug.aug_test_vote's box part written out box by box: bbox_mapping_back, then
    remove_boxes' if-chain on the area, then mmdet's multiclass_nms with linear soft-NMS per class."""
    views = [(scale, flip, ranges) for scale, ranges in zip(aug.scales, aug.scale_ranges) for flip in (False, True)]
    cands = []
    for view_boxes, view_scores, (h, w), flip, (_, _, ranges) in zip(boxes, scores, image_sizes, flipped, views):
        oh, ow = original
        for box, score in zip(view_boxes.tolist(), view_scores.tolist()):
            x1, y1, x2, y2 = box
            if flip:
                x1, x2 = w - x2, w - x1
            x1, x2, y1, y2 = x1 / (w / ow), x2 / (w / ow), y1 / (h / oh), y2 / (h / oh)
            area = (x2 - x1) * (y2 - y1)
            keep = area < 0
            if "s" in ranges:
                keep = keep or area <= 32 * 32
            if "m" in ranges:
                keep = keep or 32 * 32 < area <= 96 * 96
            if "l" in ranges:
                keep = keep or area > 96 * 96
            if keep:
                cands += [(p, label, [x1, y1, x2, y2]) for label, p in enumerate(score[:-1]) if p > aug.score_thr]
    kept = ref.soft_nms_linear_per_class(cands, aug.soft_nms["iou_threshold"], 1e-3)[: aug.max_per_img]
    return kept


@pytest.mark.parametrize("seed", range(3))
def test_merge_rule_against_a_re_derivation_on_random_predictions(seed):
    g = torch.Generator().manual_seed(seed)
    aug = AugTest(scales=((300, 100), (300, 200)), scale_ranges=(("l",), ("s", "m")), score_thr=0.05, max_per_img=40)
    original = (150, 230)
    image_sizes = [(100, 153), (100, 153), (200, 307), (200, 307)]
    flipped = [False, True, False, True]
    boxes, scores = [], []
    for h, w in image_sizes:
        xy = torch.rand(30, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = torch.rand(30, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6]) + 2
        boxes.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], dim=1))
        scores.append((torch.randn(30, 5, generator=g) * 2).softmax(dim=1))
    dets, labels = merge_views(boxes, scores, image_sizes, flipped, original, aug)
    expected = reference_merge(boxes, scores, image_sizes, flipped, original, aug)
    assert len(expected) > 10 and dets.shape[0] == len(expected)
    assert torch.allclose(dets[:, 4], torch.tensor([c[0] for c in expected]), atol=1e-5)
    assert labels.tolist() == [c[1] for c in expected]
    assert torch.allclose(dets[:, :4], torch.tensor([c[2] for c in expected]), atol=1e-3)


def test_mask_merge_unflips_then_averages():
    g = torch.Generator().manual_seed(0)
    probs = [torch.rand(5, 28, 28, generator=g) for _ in range(4)]
    flipped = [False, True, False, True]
    expected = np.mean([p.numpy()[:, :, ::-1] if f else p.numpy() for p, f in zip(probs, flipped)], axis=0)
    assert np.allclose(merge_mask_probabilities(probs, flipped).numpy(), expected, atol=1e-7)


@pytest.fixture(scope="module")
def detector():
    backbone = json.loads((FIXTURES / "det_beit.json").read_text())["backbone"]
    state = dict(torch.load(FIXTURES / "det_beit.pth", weights_only=False)["state_dict"])
    state.update(torch.load(FIXTURES / "htc_head.pth", weights_only=True)["state_dict"])
    detector = vitadapter.load_upstream_detector(dict(META["model"], backbone=backbone), state).eval()
    detector.test_scale = (96, 64)
    return detector


def image(h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, h // 8, w // 8, generator=g) * 255
    return torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear")[0].round()


def test_single_scale_without_flip_is_plain_detection(detector):
    roi = detector.roi_head
    aug = AugTest(scales=(detector.test_scale,), scale_ranges=(("s", "m", "l"),), flip=False, score_thr=roi.score_thr,
                  soft_nms=roi.soft_nms, max_per_img=roi.max_per_img)
    with torch.no_grad():
        (plain,) = detector([image()])
        (merged,) = detector.detect_aug([image()], aug)
    assert plain["scores"].numel() > 20
    assert torch.allclose(merged["scores"], plain["scores"], atol=1e-6) and torch.equal(merged["labels"], plain["labels"])
    assert torch.allclose(merged["boxes"], plain["boxes"], atol=1e-4)
    assert (merged["masks"] != plain["masks"]).float().mean() <= 1e-3


def test_flipped_image_gives_the_merged_result_flipped(detector):
    """Resizing by 1 and by exactly 2 commutes with mirroring, so the mirrored image's views are the
    original's views with the flips swapped: its merged detections are the original's mirrored."""
    aug = AugTest(scales=((96, 64), (192, 128)), scale_ranges=(("m", "l"), ("s", "m")), max_per_img=60)
    original = image()
    with torch.no_grad():
        (result,) = detector.detect_aug([original], aug)
        (mirrored,) = detector.detect_aug([original.flip(-1)], aug)
    width = original.shape[-1]
    assert result["scores"].numel() > 20
    assert torch.allclose(mirrored["scores"], result["scores"], atol=1e-5) and torch.equal(mirrored["labels"], result["labels"])
    back = mirrored["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
    assert torch.allclose(back, result["boxes"], atol=1e-3)
    assert (mirrored["masks"].flip(-1) != result["masks"]).float().mean() <= 1e-3
    # and the flips matter: without them the result differs
    (unflipped,) = detector.detect_aug([original], AugTest(aug.scales, aug.scale_ranges, flip=False, max_per_img=60))
    assert unflipped["scores"].shape != result["scores"].shape or not torch.allclose(unflipped["scores"], result["scores"])


@pytest.mark.parametrize("name,config", [
    ("htc_augreg_adapter_l", "htc++_augreg_adapter_large_fpn_3x_coco"),
    ("htc_beit_adapter_l", "htc++_beit_adapter_large_fpn_3x_coco"),
    ("htc_beitv2_adapter_l", "htc++_beitv2_adapter_large_fpn_3x_coco"),
    ("htc_beitv2_adapter_l_gn", "htc++_beitv2_adapter_large_fpn_o365_coco"),
])
def test_registered_aug_test_is_upstreams_ms_config(name, config):
    ms = CONFIGS[config]["multi_scale"]
    with meta_device():
        aug = vitadapter.create_model(name).aug_test
    assert ms["type"] == "HybridTaskCascadeAug" and ms["flip"] is aug.flip is True
    assert [list(s) for s in aug.scales] == ms["img_scale"]
    upstream = ms["test_cfg"]["aug"]
    assert [list(r) for r in aug.scale_ranges] == upstream["scale_ranges"]
    assert (aug.score_thr, aug.max_per_img) == (upstream["score_thr"], upstream["max_per_img"])
    assert upstream["nms"] == dict(type="soft_nms", **aug.soft_nms)


def test_bad_aug_settings_and_detectors_without_one_are_named(detector):
    with pytest.raises(ValueError, match="scale_ranges"):
        AugTest(scales=((100, 50),), scale_ranges=(("s",), ("m",)))
    with pytest.raises(ValueError, match="'xl'"):
        AugTest(scales=((100, 50),), scale_ranges=(("xl",),))
    with pytest.raises(ValueError, match="scales"):
        AugTest(scales=((100,),), scale_ranges=(("s",),))
    with pytest.raises(ValueError, match="aug"):
        detector.detect_aug([image()])  # load_upstream_detector's detector has no _ms settings
    with meta_device():
        mask_rcnn = vitadapter.create_model("mask_rcnn_vit_adapter_t")
    assert mask_rcnn.aug_test is None
    with pytest.raises(ValueError, match="HTC"):
        mask_rcnn.detect_aug_from_pyramids([], [], [], (10, 10), AugTest(scales=((100, 50),), scale_ranges=(("s",),), flip=False))


# ---- the CLI's --aug --------------------------------------------------------------------------------------


def test_eval_det_and_detect_aug_run_the_multi_scale_test(tmp_path, capsys, monkeypatch):
    """--aug answers through detect_aug (a stub that knows the right detections only there) and says
    which views it ran."""
    from test_detect_cli import StubDetector, predictions, synthetic_coco
    from vitadapter.cli import main

    class AugStub(StubDetector):
        aug_test = AugTest(scales=((1333, 800), (1600, 1000)), scale_ranges=(("s", "m"), ("l",)))

        def forward(self, images):
            raise AssertionError("--aug must run detect_aug")

        def detect_aug(self, images):
            return [self.by_size[tuple(image.shape[-2:])] for image in images]

    _, placed = synthetic_coco(tmp_path)
    stub = AugStub(predictions(placed, False))
    for command in ("eval_det", "detect"):
        monkeypatch.setattr(f"vitadapter.cli.{command}.detector_model", lambda args, device, fall_back: (stub, "stub"))
    assert main(["eval-det", "--data", str(tmp_path / "val"), "--aug"]) == 0
    out = capsys.readouterr().out
    assert "multi-scale flip test (4 views: 1333 x 800, 1600 x 1000)" in out and "bbox_mAP_copypaste: 1.000 1.000" in out
    assert main(["detect", str(tmp_path / "val"), "--aug", "--out", str(tmp_path / "out")]) == 0
    assert "at multi-scale flip test (4 views" in capsys.readouterr().out
    found = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(found) == sum(len(p["scores"]) for p in predictions(placed, False).values())


def test_aug_is_refused_where_upstream_has_none(tmp_path, capsys, monkeypatch):
    from test_detect_cli import one_line_error
    from vitadapter.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["detect", "--aug", "--size", "128"]) == 2
    one_line_error(capsys, "--aug runs upstream's own scales", "--size")
    (tmp_path / "r.json").write_text("[]")
    (tmp_path / "val").mkdir()
    assert main(["eval-det", "--data", "val", "--ann", "r.json", "--results", "r.json", "--aug"]) == 2
    one_line_error(capsys, "leave out --aug")
    monkeypatch.setattr("vitadapter.cli._models.pretrained_model", lambda name: (vitadapter.create_model(name), None))
    assert main(["detect", "--aug", "--model", "mask_rcnn_vit_adapter_t", "--device", "cpu"]) == 2
    one_line_error(capsys, "HTC++ detectors only", "mask_rcnn_vit_adapter_t")
