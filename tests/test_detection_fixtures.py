"""Detector parts against upstream's Mask R-CNN and Cascade Mask R-CNN fixtures (mmdet 2.22 on the
det_vit pyramid), stage by stage from the stored inputs of each stage and end to end."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, max_rel_err
from vitadapter.converters.mmdet import detector_heads_kwargs, detector_heads_state_dict
from vitadapter.detection import TwoStageDetectorHeads, multiclass_nms, paste_masks
from vitadapter.detection.roi_heads import boxes_to_rois, scale_factor

NAMES = ["mask_rcnn", "cascade_mask_rcnn"]


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    name = request.param
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    io = load_file(FIXTURES / f"{name}_io.safetensors")
    ckpt = torch.load(FIXTURES / f"{name}_heads.pth", weights_only=True)["state_dict"]
    model = TwoStageDetectorHeads(**detector_heads_kwargs(meta["model"])).eval()
    model.load_state_dict(detector_heads_state_dict(ckpt), strict=True)
    img = meta["img_metas"][0]
    return name, meta, io, model, tuple(img["img_shape"][:2]), tuple(img["ori_shape"][:2])


def pyramid(io):
    return [io[f"out{i}"] for i in range(4)]


def stored_stages(name, io):
    """(rois, class logits, deltas) per stage as upstream stored them."""
    if name == "mask_rcnn":
        return [(io["rois"], io["cls_score"], io["bbox_pred"])]
    return [(io[f"rois_s{k}"], io[f"cls_score_s{k}"], io[f"bbox_pred_s{k}"]) for k in range(3)]


def by_score(io):
    """Upstream's detections reordered from class-major (simple_test's lists) to multiclass_nms order."""
    order = torch.argsort(io["det_rank_b0"])
    masks = io["masks_b0"][order].bool() if "masks_b0" in io else None
    return io["det_bboxes_b0"][order], io["det_labels_b0"][order], masks


def test_state_dict_keys_are_mmdets(case):
    name, _, _, model, _, _ = case
    ckpt = torch.load(FIXTURES / f"{name}_heads.pth", weights_only=True)["state_dict"]
    assert set(model.state_dict()) == set(ckpt)


def test_fpn(case):
    _, _, io, model, _, _ = case
    with torch.no_grad():
        outs = model.neck(pyramid(io))
    assert len(outs) == 5
    for i, out in enumerate(outs):
        assert out.shape == io[f"fpn{i}"].shape
        assert max_rel_err(out, io[f"fpn{i}"]) <= 1e-5


def test_rpn_maps_and_anchors(case):
    _, _, io, model, _, _ = case
    feats = [io[f"fpn{i}"] for i in range(5)]
    with torch.no_grad():
        cls, reg = model.rpn_head(feats)
    anchors = model.rpn_head.anchor_generator([f.shape[-2:] for f in feats])
    for i in range(5):
        assert max_rel_err(cls[i], io[f"rpn_cls{i}"]) <= 1e-5
        assert max_rel_err(reg[i], io[f"rpn_reg{i}"]) <= 1e-5
        torch.testing.assert_close(anchors[i], io[f"anchors{i}"], rtol=0, atol=1e-5)


def test_proposals_from_stored_maps(case):
    _, _, io, model, img_shape, _ = case
    cls = [io[f"rpn_cls{i}"] for i in range(5)]
    reg = [io[f"rpn_reg{i}"] for i in range(5)]
    (props,) = model.rpn_head.proposals(cls, reg, [img_shape])
    expected = io["proposals_b0"]
    assert props.shape == expected.shape
    assert (props[:, :4] - expected[:, :4]).abs().max() <= 1e-5 * max(img_shape)
    assert (props[:, 4] - expected[:, 4]).abs().max() <= 1e-6


def test_stage_scores_and_deltas_on_stored_rois(case):
    name, _, io, model, img_shape, _ = case
    feats = [io[f"fpn{i}"] for i in range(5)]
    stored = stored_stages(name, io)
    with torch.no_grad():
        # each stage on ITS stored RoIs, and the refinement chain from the stored first stage's RoIs
        for head, (rois, cls, deltas) in zip(model.roi_head.bbox_heads, stored):
            got_cls, got_deltas = head(model.roi_head.bbox_roi_extractor(feats, rois))
            assert max_rel_err(got_cls, cls) <= 1e-4
            assert max_rel_err(got_deltas, deltas) <= 1e-4
        chain = model.roi_head.stage_outputs(feats, stored[0][0], [img_shape])
    for (rois, cls, deltas), (want_rois, want_cls, want_deltas) in zip(chain, stored):
        assert (rois - want_rois).abs().max() <= 1e-4 * max(img_shape)
        assert max_rel_err(cls, want_cls) <= 1e-4
        assert max_rel_err(deltas, want_deltas) <= 1e-4
    if name == "cascade_mask_rcnn":
        mean = sum(cls for _, cls, _ in chain) / 3
        assert max_rel_err(mean, io["cls_score_avg"]) <= 1e-4


def test_detections_from_stored_head_outputs(case):
    """multiclass_nms and the rescale on upstream's own last-stage outputs: the discrete rules alone."""
    name, meta, io, model, img_shape, ori_shape = case
    rois, _, deltas = stored_stages(name, io)[-1]
    logits = io["cls_score"] if name == "mask_rcnn" else io["cls_score_avg"]
    factor = scale_factor(img_shape, ori_shape, rois.device)
    boxes = model.roi_head.bbox_heads[-1].decode(rois[:, 1:], deltas, img_shape)
    boxes = (boxes.reshape(len(boxes), -1, 4) / factor).reshape(len(boxes), -1)
    rcnn = meta["test_cfg"]["rcnn"]
    det_boxes, det_scores, det_labels = multiclass_nms(
        boxes, logits.softmax(-1), rcnn["score_thr"], rcnn["nms"]["iou_threshold"], rcnn["max_per_img"]
    )
    want, want_labels, _ = by_score(io)
    assert torch.equal(det_labels, want_labels)
    assert (det_boxes - want[:, :4]).abs().max() <= 1e-5 * max(ori_shape)
    assert (det_scores - want[:, 4]).abs().max() <= 1e-6


def test_masks_from_stored_detections(case):
    name, _, io, model, img_shape, ori_shape = case
    feats = [io[f"fpn{i}"] for i in range(5)]
    factor = scale_factor(img_shape, ori_shape, feats[0].device)
    boxes, labels = io["det_bboxes_b0"][:, :4], io["det_labels_b0"]
    with torch.no_grad():
        roi_feats = model.roi_head.mask_roi_extractor(feats, boxes_to_rois([boxes * factor]))
        logits = [head.label_logits(roi_feats, labels) for head in model.roi_head.mask_heads]
    stored = [io["mask_pred_b0"]] if name == "mask_rcnn" else [io[f"mask_pred_s{k}_b0"] for k in range(3)]
    for got, want in zip(logits, stored):
        assert max_rel_err(got, want[:, 0]) <= 1e-4
    probs = io["mask_pred_b0"][:, 0].sigmoid() if name == "mask_rcnn" else io["mask_prob_b0"][:, 0]
    pasted = paste_masks(probs, boxes * factor / factor, ori_shape, 0.5)
    assert torch.equal(pasted, io["masks_b0"].bool())


def check_end_to_end(result, io, ori_shape):
    want, want_labels, want_masks = by_score(io)
    assert torch.equal(result["labels"], want_labels)
    assert (result["boxes"] - want[:, :4]).abs().max() <= 1e-4 * max(ori_shape)
    assert (result["scores"] - want[:, 4]).abs().max() <= 1e-4
    assert result["masks"].dtype == torch.bool and result["masks"].shape == want_masks.shape
    assert (result["masks"] != want_masks).float().mean() <= 1e-3


def test_end_to_end(case):
    _, _, io, model, img_shape, ori_shape = case
    with torch.no_grad():
        (result,) = model.detect_from_pyramid(pyramid(io), [img_shape], [ori_shape])
    check_end_to_end(result, io, ori_shape)


def test_batch_of_images_of_different_sizes(case):
    """Each image of a batch is detected on its own: the fixture image beside a smaller one, both orders."""
    _, _, io, model, img_shape, ori_shape = case
    batch = [torch.cat([x, x.flip(-1)]) for x in pyramid(io)]
    small, small_ori = (96, 120), (64, 80)
    with torch.no_grad():
        first, other = model.detect_from_pyramid(batch, [img_shape, small], [ori_shape, small_ori])
        other_alone = model.detect_from_pyramid([x[1:] for x in batch], [small], [small_ori])[0]
        swapped = model.detect_from_pyramid([x.flip(0) for x in batch], [small, img_shape], [small_ori, ori_shape])
    check_end_to_end(first, io, ori_shape)
    check_end_to_end(swapped[1], io, ori_shape)
    assert other["masks"].shape[1:] == small_ori
    # the same image alone: equal up to the convolutions' batch-size-dependent rounding
    assert len(other["labels"]) > 0 and torch.equal(other["labels"], other_alone["labels"])
    torch.testing.assert_close(other["boxes"], other_alone["boxes"], rtol=0, atol=1e-4 * max(small_ori))
    torch.testing.assert_close(other["scores"], other_alone["scores"], rtol=0, atol=1e-5)
    assert (other["masks"] != other_alone["masks"]).float().mean() <= 1e-3


def test_empty_batch(case):
    _, _, io, model, _, _ = case
    assert model.detect_from_pyramid([x[:0] for x in pyramid(io)], [], []) == []


def test_no_detections(case):
    """A score threshold above every score leaves empty, well-typed results."""
    _, _, io, model, img_shape, ori_shape = case
    model = copy.deepcopy(model)
    model.roi_head.score_thr = 1.0
    with torch.no_grad():
        (result,) = model.detect_from_pyramid(pyramid(io), [img_shape], [ori_shape])
    assert result["boxes"].shape == (0, 4) and result["labels"].dtype == torch.int64
    assert result["masks"].shape == (0, *ori_shape) and result["masks"].dtype == torch.bool


def test_bad_sizes_are_named(case):
    _, _, io, model, img_shape, ori_shape = case
    with pytest.raises(ValueError, match="original_sizes"):
        model.detect_from_pyramid(pyramid(io), [img_shape], [])
    with pytest.raises(ValueError, match="image_sizes"):
        model.detect_from_pyramid(pyramid(io), [(1000, 10)], [ori_shape])


def test_converter_refuses_unknown_types_by_name():
    meta = json.loads((FIXTURES / "cascade_mask_rcnn.json").read_text())
    for path, value, named in [
        (("type",), "HybridTaskCascade", "HybridTaskCascade"),
        (("neck", "type"), "PAFPN", "PAFPN"),
        (("roi_head", "bbox_head", 1, "type"), "DoubleConvFCBBoxHead", "DoubleConvFCBBoxHead"),
        (("test_cfg", "rcnn", "nms", "type"), "soft_nms", "soft_nms"),
        (("neck", "add_extra_convs"), "on_input", "add_extra_convs"),
        (("rpn_head", "anchor_generator", "octave_base_scale"), 4, "octave_base_scale"),
    ]:
        cfg = copy.deepcopy(meta["model"])
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(ValueError, match=named):
            detector_heads_kwargs(cfg)
    with pytest.raises(ValueError, match="not an mmdet detector"):
        detector_heads_state_dict({"backbone.x": torch.zeros(1)})
