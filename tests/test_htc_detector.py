"""HTC++ after the backbone (ExtraAttention + FPN neck, RPN, HTC RoI head) against upstream's `htc`
fixture (mmdet 2.22's own simple_test on the det_beit pyramid), stage by stage from each stage's stored
inputs and end to end; and on inputs the fixture cannot reach (two images of different sizes, another
class count, RoIs on every level) against tests/detection_reference.py's plain re-derivation."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import detection_reference as ref
from conftest import FIXTURES, max_rel_err
from vitadapter.converters.mmdet import detector_heads_kwargs, detector_heads_state_dict
from vitadapter.detection import TwoStageDetectorHeads, paste_masks
from vitadapter.detection.htc_roi_heads import HTCRoIHeads
from vitadapter.detection.roi_heads import boxes_to_rois, decode_to_original, scale_factor
from vitadapter.detection.semantic_head import fuse_semantic
from vitadapter.detection.soft_nms import multiclass_soft_nms

META = json.loads((FIXTURES / "htc.json").read_text())
IO = load_file(FIXTURES / "htc_io.safetensors")
IMG_SHAPE = tuple(META["img_metas"][0]["img_shape"][:2])
ORI_SHAPE = tuple(META["img_metas"][0]["ori_shape"][:2])


def checkpoint():
    return torch.load(FIXTURES / "htc_head.pth", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def model():
    heads = TwoStageDetectorHeads(**detector_heads_kwargs(META["model"])).eval()
    heads.load_state_dict(detector_heads_state_dict(checkpoint()), strict=True)
    return heads


def pyramid():
    return [IO[f"out{i}"] for i in range(4)]


def fpn():
    return [IO[f"fpn{i}"] for i in range(5)]


def upstream_by_score():
    """simple_test's class-major results put back in soft-NMS order (best first)."""
    order = IO["result_order_i0"]
    boxes, labels, masks = (torch.empty_like(IO[k]) for k in ("result_bboxes_i0", "result_labels_i0", "result_masks_i0"))
    boxes[order], labels[order], masks[order] = IO["result_bboxes_i0"], IO["result_labels_i0"], IO["result_masks_i0"]
    return boxes, labels, masks.bool()


def test_state_dict_keys_are_mmdets(model):
    keys = set(model.state_dict())
    assert keys == set(checkpoint())
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in keys if k.startswith("neck.")} == {"neck.0", "neck.1"}


def test_neck(model):
    with torch.no_grad():
        attended = model.neck[0](pyramid())
        outs = model.neck(pyramid())
    for i in range(3):
        assert torch.equal(attended[i], IO[f"out{i}"])
    assert max_rel_err(attended[3], IO["extra_attn_out3"]) <= 1e-5
    assert len(outs) == 5
    for i, out in enumerate(outs):
        assert out.shape == IO[f"fpn{i}"].shape and max_rel_err(out, IO[f"fpn{i}"]) <= 1e-5


def test_rpn_maps_anchors_and_proposals(model):
    with torch.no_grad():
        cls, reg = model.rpn_head(fpn())
    anchors = model.rpn_head.anchor_generator([f.shape[-2:] for f in fpn()])
    for i in range(5):
        assert max_rel_err(cls[i], IO[f"rpn_cls_l{i}"]) <= 1e-5
        assert max_rel_err(reg[i], IO[f"rpn_reg_l{i}"]) <= 1e-5
        torch.testing.assert_close(anchors[i], IO[f"anchors_l{i}"], rtol=0, atol=1e-5)
    stored_cls, stored_reg = [IO[f"rpn_cls_l{i}"] for i in range(5)], [IO[f"rpn_reg_l{i}"] for i in range(5)]
    (props,) = model.rpn_head.proposals(stored_cls, stored_reg, [IMG_SHAPE])
    want = IO["proposals_i0"]
    assert props.shape == want.shape
    assert (props[:, :4] - want[:, :4]).abs().max() <= 1e-5 * max(IMG_SHAPE)
    assert (props[:, 4] - want[:, 4]).abs().max() <= 1e-6


def test_semantic_branch(model):
    with torch.no_grad():
        logits, feat = model.roi_head.semantic_head(fpn())
        assert torch.equal(model.roi_head.semantic_features(fpn()), feat)
    assert max_rel_err(logits, IO["semantic_logits"]) <= 1e-5
    assert max_rel_err(feat, IO["semantic_feat"]) <= 1e-5


def test_stage_scores_and_deltas(model):
    """Each stage on its stored RoIs, then the whole chain from the stored proposals."""
    heads = model.roi_head
    with torch.no_grad():
        for k, head in enumerate(heads.bbox_heads):
            rois = IO[f"s{k}_rois_i0"]
            cls, deltas = head(fuse_semantic(heads.bbox_roi_extractor(fpn(), rois), IO["semantic_feat"], rois))
            assert max_rel_err(cls, IO[f"s{k}_cls_score_i0"]) <= 1e-4
            assert max_rel_err(deltas, IO[f"s{k}_bbox_pred_i0"]) <= 1e-4
        chain = heads.stage_outputs(fpn(), IO["semantic_feat"], IO["s0_rois_i0"], [IMG_SHAPE])
    assert torch.equal(IO["s0_rois_i0"], boxes_to_rois([IO["proposals_i0"]]))
    for k, (rois, cls, deltas) in enumerate(chain):
        assert (rois - IO[f"s{k}_rois_i0"]).abs().max() <= 1e-4 * max(IMG_SHAPE)
        if k < 2:
            torch.testing.assert_close(IO[f"s{k}_refined_rois_i0"], IO[f"s{k + 1}_rois_i0"], rtol=0, atol=0)
        assert max_rel_err(cls, IO[f"s{k}_cls_score_i0"]) <= 1e-4
        assert max_rel_err(deltas, IO[f"s{k}_bbox_pred_i0"]) <= 1e-4
    assert max_rel_err(sum(cls for _, cls, _ in chain) / 3, IO["cls_score_mean_i0"]) <= 1e-4


def test_soft_nms_input_and_output(model):
    """From upstream's own last-stage outputs: the boxes soft-NMS reads, then its detections."""
    heads = model.roi_head
    boxes = decode_to_original(heads.bbox_heads[-1], IO["s2_rois_i0"], IO["s2_bbox_pred_i0"], IMG_SHAPE, ORI_SHAPE)
    assert max_rel_err(boxes, IO["bboxes_pre_nms_i0"]) <= 1e-6
    assert heads.soft_nms == {"iou_threshold": 0.5} and heads.score_thr == 0.001 and heads.max_per_img == 100
    dets, labels = multiclass_soft_nms(
        IO["bboxes_pre_nms_i0"], IO["cls_score_mean_i0"].softmax(-1), heads.score_thr, heads.max_per_img, **heads.soft_nms
    )
    assert torch.equal(labels, IO["det_labels_i0"])
    assert (dets - IO["det_bboxes_i0"]).abs().max() <= 1e-5 * max(ORI_SHAPE)


def test_masks_from_stored_detections(model):
    heads = model.roi_head
    det, labels = IO["det_bboxes_i0"][:, :4], IO["det_labels_i0"]
    factor = scale_factor(IMG_SHAPE, ORI_SHAPE, det.device)
    with torch.no_grad():
        probs = heads.mask_probabilities(fpn(), IO["semantic_feat"], boxes_to_rois([det * factor]), labels)
    assert (probs - IO["mask_prob_mean_i0"]).abs().max() <= 1e-5
    pasted = paste_masks(IO["mask_prob_mean_i0"], det * factor / factor, ORI_SHAPE, heads.mask_thr_binary)
    _, _, want = upstream_by_score()
    assert torch.equal(pasted, want)


def check_end_to_end(result):
    boxes, labels, masks = upstream_by_score()
    assert torch.equal(result["labels"], labels)
    assert (result["boxes"] - boxes[:, :4]).abs().max() <= 1e-4 * max(ORI_SHAPE)
    assert (result["scores"] - boxes[:, 4]).abs().max() <= 1e-4
    assert bool((result["scores"][1:] <= result["scores"][:-1]).all())
    assert result["masks"].dtype == torch.bool and result["masks"].shape == masks.shape
    assert (result["masks"] != masks).float().mean() <= 1e-3


def test_end_to_end(model):
    with torch.no_grad():
        (result,) = model.detect_from_pyramid(pyramid(), [IMG_SHAPE], [ORI_SHAPE])
    assert set(result) == {"boxes", "scores", "labels", "masks"}
    check_end_to_end(result)


def test_batch_of_images_of_different_sizes(model):
    """The fixture image beside a smaller one, in both orders; the smaller one as if alone."""
    batch = [torch.cat([x, x.flip(-1)]) for x in pyramid()]
    small, small_ori = (96, 120), (64, 80)
    with torch.no_grad():
        first, other = model.detect_from_pyramid(batch, [IMG_SHAPE, small], [ORI_SHAPE, small_ori])
        alone = model.detect_from_pyramid([x[1:] for x in batch], [small], [small_ori])[0]
        swapped = model.detect_from_pyramid([x.flip(0) for x in batch], [small, IMG_SHAPE], [small_ori, ORI_SHAPE])
    check_end_to_end(first)
    check_end_to_end(swapped[1])
    assert other["masks"].shape[1:] == small_ori
    assert len(other["labels"]) > 0 and torch.equal(other["labels"], alone["labels"])
    torch.testing.assert_close(other["boxes"], alone["boxes"], rtol=0, atol=1e-4 * max(small_ori))
    torch.testing.assert_close(other["scores"], alone["scores"], rtol=0, atol=1e-4)
    assert (other["masks"] != alone["masks"]).float().mean() <= 1e-3


def test_empty_batch_and_no_detections(model):
    assert model.detect_from_pyramid([x[:0] for x in pyramid()], [], []) == []
    strict = copy.deepcopy(model)
    strict.roi_head.score_thr = 1.0
    with torch.no_grad():
        (result,) = strict.detect_from_pyramid(pyramid(), [IMG_SHAPE], [ORI_SHAPE])
    assert result["boxes"].shape == (0, 4) and result["scores"].shape == (0,) and result["labels"].dtype == torch.int64
    assert result["masks"].shape == (0, *ORI_SHAPE) and result["masks"].dtype == torch.bool


# ---------------------------------------------------------------------------------------------------
# beyond the fixture: another class count, two image sizes, RoIs on every level


STRIDES = (4, 8, 16, 32, 64)
PAD = (512, 640)


def make_htc_heads(num_classes, seed):
    torch.manual_seed(seed)
    stds = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
    box = dict(in_channels=8, num_classes=num_classes, num_shared_convs=4, num_shared_fcs=1, conv_out_channels=8,
               fc_out_channels=16, reg_class_agnostic=True)
    mask = dict(in_channels=8, conv_out_channels=8, num_classes=num_classes, num_convs=2)
    heads = HTCRoIHeads(
        [dict(box, target_stds=s) for s in stds],
        [dict(mask, with_conv_res=k > 0) for k in range(3)],
        dict(num_ins=5, fusion_level=1, num_convs=2, in_channels=8, conv_out_channels=8, num_classes=5),
        score_thr=0.01, soft_nms={"iou_threshold": 0.5, "min_score": 0.01}, max_per_img=40,
    )
    with torch.no_grad():
        for name, p in heads.named_parameters():
            # larger deltas than an untrained head's, so the cascade moves boxes across levels, and
            # sharper class scores, so soft-NMS decays some of the kept ones
            gain = {"fc_reg": 0.5, "fc_cls": 4.0}.get(name.split(".")[-2], 1.0)
            p.copy_(torch.randn_like(p) * gain / max(p[0].numel(), 1) ** 0.5)
    return heads.eval()


def random_boxes(n, image_size, generator, min_side=12.0, max_side=900.0):
    h, w = image_size
    side = torch.exp(torch.empty(n, 2).uniform_(float(torch.tensor(min_side).log()), float(torch.tensor(max_side).log()), generator=generator))
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([w, h])
    boxes = torch.cat([centre - side / 2, centre + side / 2], 1)
    return boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h], dtype=torch.float32))


def clustered_proposals(image_sizes, generator):
    """Per image: groups of four jittered copies of random boxes (so soft-NMS has overlaps to decay)
    plus one box large enough for the stride-32 level (sqrt(wh) >= 448)."""
    out = []
    for h, w in image_sizes:
        base = random_boxes(8, (h, w), generator).repeat_interleave(4, dim=0)
        side = (base[:, 2:] - base[:, :2]).repeat(1, 2)
        jittered = (base + 0.04 * side * torch.randn(base.shape, generator=generator)).clamp(min=0)
        jittered = jittered.minimum(torch.tensor([w, h, w, h], dtype=torch.float32))
        out.append(torch.cat([jittered, torch.tensor([[10.0, 5.0, w - 3.0, h - 9.0]])]))
    return out


def test_htc_roi_stage_against_reference():
    """Three classes, two images of different sizes (one downscaled, one upscaled from its original):
    per-stage RoIs and logits, final boxes, scores, labels and masks against the plain re-derivation."""
    g = torch.Generator().manual_seed(3)
    heads = make_htc_heads(3, seed=4)
    feats = [torch.randn(2, 8, -(-PAD[0] // s), -(-PAD[1] // s), generator=g) for s in STRIDES]
    image_sizes, original_sizes = [(512, 640), (448, 600)], [(341, 427), (600, 800)]
    proposals = clustered_proposals(image_sizes, g)
    with torch.no_grad():
        got = heads(feats, proposals, image_sizes, original_sizes)
        semantic = heads.semantic_features(feats)
        stages = heads.stage_outputs(feats, semantic, boxes_to_rois(proposals), image_sizes)
        want = ref.htc_roi_stage(heads, feats, semantic, proposals, image_sizes, original_sizes)
    assert {ref.roi_level(r[1:]) for rois, _, _ in stages for r in rois.tolist()} == {0, 1, 2, 3}
    offset = 0
    for res, exp, original in zip(got, want, original_sizes):
        n = len(exp["stages"][0][0])
        for (rois, logits, _), (want_rois, want_logits) in zip(stages, exp["stages"]):
            torch.testing.assert_close(rois[offset: offset + n].double(), want_rois, rtol=0, atol=1e-3)
            torch.testing.assert_close(logits[offset: offset + n].double(), want_logits, rtol=1e-4, atol=1e-4)
        offset += n
        assert len(exp["labels"]) > 3 and len(set(exp["labels"].tolist())) > 1
        assert torch.equal(res["labels"], exp["labels"])
        torch.testing.assert_close(res["boxes"].double(), exp["boxes"], rtol=0, atol=1e-4 * max(original))
        torch.testing.assert_close(res["scores"].double(), exp["scores"], rtol=0, atol=1e-5)
        assert res["masks"].shape == (len(exp["labels"]), *original)
        decided = (exp["probs"] - 0.5).abs() > 1e-5
        assert torch.equal(res["masks"][decided], exp["masks"][decided])
        assert exp["masks"].any() and not exp["masks"].all()
    # soft-NMS, not NMS, decided these: it lowered some of the kept scores in each image
    assert all(exp["decayed"] > 0 for exp in want)


def test_images_without_proposals():
    heads = make_htc_heads(3, seed=4)
    g = torch.Generator().manual_seed(6)
    feats = [torch.randn(2, 8, -(-PAD[0] // s), -(-PAD[1] // s), generator=g) for s in STRIDES]
    sizes, originals = [(512, 640), (448, 600)], [(341, 427), (600, 800)]
    boxes = random_boxes(10, sizes[1], g)
    with torch.no_grad():
        empty, full = heads(feats, [torch.zeros(0, 5), boxes], sizes, originals)
        none = heads(feats, [torch.zeros(0, 5), torch.zeros(0, 5)], sizes, originals)
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, *originals[0])
    assert len(full["labels"]) > 0 and full["masks"].shape[1:] == originals[1]
    assert all(r["boxes"].shape == (0, 4) and r["masks"].shape == (0, *o) for r, o in zip(none, originals))


def test_soft_nms_settings_come_from_the_config():
    cfg = copy.deepcopy(META["model"])
    cfg["test_cfg"]["rcnn"]["nms"] = {"type": "soft_nms", "iou_threshold": 0.4, "method": "gaussian", "sigma": 0.7, "min_score": 0.01}
    kwargs = detector_heads_kwargs(cfg)["roi_head"]
    assert kwargs["soft_nms"] == {"iou_threshold": 0.4, "method": "gaussian", "sigma": 0.7, "min_score": 0.01}
    heads = TwoStageDetectorHeads(**detector_heads_kwargs(cfg)).eval()
    heads.load_state_dict(detector_heads_state_dict(checkpoint()))
    with torch.no_grad():
        (result,) = heads.detect_from_pyramid(pyramid(), [IMG_SHAPE], [ORI_SHAPE])
    probs = IO["cls_score_mean_i0"].softmax(-1)
    want, labels = multiclass_soft_nms(IO["bboxes_pre_nms_i0"], probs, 0.001, 100, **kwargs["soft_nms"])
    assert torch.equal(result["labels"], labels)
    assert (result["scores"] - want[:, 4]).abs().max() <= 1e-4


def set_path(cfg, path, value):
    node = cfg
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value


@pytest.mark.parametrize("path,value,named", [
    (("test_cfg", "rcnn", "nms", "type"), "nms", "nms"),
    (("test_cfg", "rcnn", "nms", "class_agnostic"), True, "class_agnostic"),
    (("roi_head", "mask_info_flow"), False, "mask_info_flow"),
    (("roi_head", "semantic_fusion"), ("bbox",), "semantic_fusion"),
    (("roi_head", "semantic_head"), KeyError, "semantic_head"),
    (("roi_head", "semantic_head", "type"), "GlobalContextHead", "GlobalContextHead"),
    (("roi_head", "mask_head", 1, "type"), "FCNMaskHead", "FCNMaskHead"),
    (("roi_head", "type"), "CascadeRoIHead", "HybridTaskCascade"),
    (("neck", 0, "norm_layer"), "BN", "norm_layer"),
    (("neck", 1, "type"), "PAFPN", "PAFPN"),
])
def test_converter_refuses_what_it_cannot_run_by_name(path, value, named):
    cfg = copy.deepcopy(META["model"])
    set_path(cfg, path, value)
    with pytest.raises(ValueError, match=named):
        detector_heads_kwargs(cfg)


def test_htc_roi_head_rejects_bad_arguments():
    box = dict(in_channels=8, num_classes=2, conv_out_channels=8, fc_out_channels=8)
    mask = dict(in_channels=8, conv_out_channels=8, num_classes=2, num_convs=1)
    sem = dict(num_ins=2, fusion_level=0, num_convs=1, in_channels=8, conv_out_channels=8, num_classes=3)
    with pytest.raises(ValueError, match="mask_heads"):
        HTCRoIHeads([box, box], [mask], sem)
    with pytest.raises(ValueError, match="with_conv_res"):
        HTCRoIHeads([box, box], [mask, dict(mask, with_conv_res=False)], sem)
    with pytest.raises(ValueError, match="soft_nms"):
        HTCRoIHeads([box], [mask], sem, soft_nms={"threshold": 0.5})
    with pytest.raises(ValueError, match="method"):
        HTCRoIHeads([box], [mask], sem, soft_nms={"method": "hard"})


def test_upstream_full_size_config_builds_the_same_layout():
    """Upstream's HTC++ config unreduced (256-wide heads, 1024-wide pyramid, 183 semantic classes) builds,
    on the meta device, the fixture's module layout: the same checkpoint keys."""
    cfg = copy.deepcopy(META["upstream_model_cfg"])
    cfg["test_cfg"] = META["test_cfg"]
    with torch.device("meta"):
        heads = TwoStageDetectorHeads(**detector_heads_kwargs(cfg))
    assert set(heads.state_dict()) == set(checkpoint())
    assert heads.roi_head.semantic_head.conv_logits.out_channels == 183 and heads.num_classes == 80
    assert heads.neck[0].in_channels == (1024,) * 4 and heads.neck[1].out_channels == 256


def test_whole_htc_detector_loads_through_load_upstream_detector_and_runs_from_the_image():
    """Upstream's whole HTC++ model dict (with the det_beit backbone it ran on) and checkpoint, from the
    backbone fixture's normalised and padded image to the final detections."""
    import vitadapter
    from vitadapter.models.checkpoints import load_detector_checkpoint

    backbone = json.loads((FIXTURES / "det_beit.json").read_text())["backbone"]
    state = dict(torch.load(FIXTURES / "det_beit.pth", weights_only=False)["state_dict"])
    state.update(torch.load(FIXTURES / "htc_head.pth", weights_only=True)["state_dict"])
    detector = vitadapter.load_upstream_detector(dict(META["model"], backbone=backbone), state).eval()
    image = load_file(FIXTURES / "det_beit_io.safetensors")["input"]
    with torch.no_grad():
        (result,) = detector.detect(image, [IMG_SHAPE], [ORI_SHAPE])
    check_end_to_end(result)
    mask_rcnn = torch.load(FIXTURES / "mask_rcnn_heads.pth", weights_only=True)["state_dict"]
    backbone_state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    with pytest.raises(ValueError, match="Mask R-CNN.*the model is an HTC"):
        load_detector_checkpoint(detector, {**backbone_state, **mask_rcnn})
