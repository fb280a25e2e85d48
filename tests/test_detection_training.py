"""The detectors' training computations (mmdet 2.x's box coding, MaxIoUAssigner, RandomSampler, RPN / box /
mask losses, the cascade's refinement) against plain re-derivations written here per anchor and per RoI
with loops and float64, plus the properties training needs: gradients reach every parameter and a few
hundred steps drive the loss down."""
import math

import numpy as np
import pytest
import torch

import detection_reference as ref
from vitadapter.detection import ConvFCBBoxHead, DeltaXYWHBBoxCoder, FCNMaskHead, RPNHead, TwoStageDetectorHeads
from vitadapter.detection.assigner import MaxIoUAssigner
from vitadapter.detection.box_losses import BoxRegressionLoss
from vitadapter.detection.mask_head import mask_targets
from vitadapter.detection.sampler import RandomSampler
from vitadapter.detection.training import (
    DetectorTraining, StageTraining, cascade_mask_rcnn_training, detector_losses, mask_rcnn_training, roi_losses,
)

STDS = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
TAKE_ALL = 10 ** 6  # a sampler this large keeps every candidate: sampling becomes deterministic


def random_boxes(n, h, w, g, min_side=4.0):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    wh = min_side + torch.rand(n, 2, generator=g) * torch.tensor([w, h]) / 2
    return torch.cat([xy, xy + wh], 1)


def jitter(boxes, g, scale=0.15):
    """Boxes near ``boxes``, so that every IoU regime (positive, ignored, negative) occurs."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + (torch.rand(boxes.shape, generator=g) - 0.5) * 2 * scale * wh


# ---- plain re-derivations ------------------------------------------------------------------------


def encode_ref(box, gt, stds):
    pw, ph = box[2] - box[0], box[3] - box[1]
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    d = [((gt[0] + gt[2]) / 2 - (box[0] + box[2]) / 2) / pw, ((gt[1] + gt[3]) / 2 - (box[1] + box[3]) / 2) / ph,
         math.log(gw / pw), math.log(gh / ph)]
    return [v / s for v, s in zip(d, stds)]


def decode_ref(box, delta, stds):
    """mmdet's delta2bbox without clipping (the box loss decodes with no image bound)."""
    w, h = box[2] - box[0], box[3] - box[1]
    dx, dy, dw, dh = (d * s for d, s in zip(delta, stds))
    dw, dh = (min(max(v, -ref.MAX_LOG_RATIO), ref.MAX_LOG_RATIO) for v in (dw, dh))
    cx, cy = box[0] + w / 2 + w * dx, box[1] + h / 2 + h * dy
    w, h = w * math.exp(dw), h * math.exp(dh)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def giou_ref(a, b):
    inter_w = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    inter_h = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclose - union) / enclose


def iou32(a, b):
    """IoU in float32 arithmetic, operation by operation as mmdet computes it: on anchor grids a gt inside
    several same-shape anchors ties with all of them exactly, and float32 rounding decides those ties."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), np.float32(0)) * max(min(a[3], b[3]) - max(a[1], b[1]), np.float32(0))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


def assign_ref(boxes, gts, pos_thr, neg_thr, min_pos, low_quality, assign_all, ignore=(), ignore_thr=-1.0, iou=ref.iou):
    """mmdet's MaxIoUAssigner, one box and one gt at a time."""
    boxes, gts = boxes.tolist(), gts.tolist()
    if not gts or not boxes:
        return [0] * len(boxes)
    ov = [[iou(g, b) for b in boxes] for g in gts]
    if ignore_thr > 0 and len(ignore):
        for j, b in enumerate(boxes):
            area = (b[2] - b[0]) * (b[3] - b[1])
            iofs = [max(min(b[2], r[2]) - max(b[0], r[0]), 0) * max(min(b[3], r[3]) - max(b[1], r[1]), 0) / area
                    for r in ignore.double().tolist()]
            if max(iofs) > ignore_thr:
                for row in ov:
                    row[j] = -1.0
    low, high = neg_thr if isinstance(neg_thr, tuple) else (0.0, neg_thr)
    out = []
    for j in range(len(boxes)):
        col = [row[j] for row in ov]
        best = max(col)
        out.append(col.index(best) + 1 if best >= pos_thr else 0 if low <= best < high else -1)
    if low_quality:
        for i, row in enumerate(ov):
            best = max(row)
            if best >= min_pos:
                for j in (range(len(boxes)) if assign_all else [row.index(best)]):
                    if row[j] == best:
                        out[j] = i + 1
    return out


def anchors_ref(featmap_sizes, strides, ratios=(0.5, 1.0, 2.0), scales=(8,)):
    """Per level, rows (y, x, anchor): base boxes of side stride * scale, shape set by ratio = h / w."""
    out = []
    for (fh, fw), s in zip(featmap_sizes, strides):
        for y in range(fh):
            for x in range(fw):
                for r in ratios:
                    for sc in scales:
                        w, h = s * sc / math.sqrt(r), s * sc * math.sqrt(r)
                        out.append((s, [x * s - w / 2, y * s - h / 2, x * s + w / 2, y * s + h / 2], (y, x)))
    return out


def bce(logit, target):
    return max(logit, 0) - logit * target + math.log1p(math.exp(-abs(logit)))


def reg_ref(pred, target, kind, beta=1.0):
    if kind == "giou":
        return 1 - giou_ref(pred, target)
    diffs = [abs(p - t) for p, t in zip(pred, target)]
    return sum(d - 0.5 * beta if d >= beta else 0.5 * d * d / beta for d in diffs) if kind == "smooth_l1" else sum(diffs)


# ---- box coding, assigner, sampler ----------------------------------------------------------------


def test_encode_by_hand_and_round_trip():
    coder = DeltaXYWHBBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    deltas = coder.encode(torch.tensor([[0.0, 0.0, 10.0, 20.0]]), torch.tensor([[5.0, 5.0, 25.0, 45.0]]))
    expected = [1.0 / 0.1, 0.75 / 0.1, math.log(2) / 0.2, math.log(2) / 0.2]
    assert torch.allclose(deltas[0].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(200, 300, 400, g)
    targets = jitter(boxes, g, scale=0.4)
    for means, stds in (((0.0,) * 4, (1.0,) * 4), ((0.1, -0.2, 0.05, 0.0), (0.033, 0.033, 0.067, 0.067))):
        coder = DeltaXYWHBBoxCoder(means, stds)
        torch.testing.assert_close(coder.decode(boxes, coder.encode(boxes, targets)), targets, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="boxes and targets"):
        coder.encode(boxes, targets[:3])


def test_assigner_by_hand():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 140.0, 140.0]])
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],      # IoU 1 with gt 0: positive
        [0.0, 0.0, 10.0, 5.0],       # IoU 0.5: between the thresholds, ignored
        [50.0, 50.0, 60.0, 60.0],    # no overlap: background
        [100.0, 100.0, 120.0, 130.0],  # IoU 0.375 with gt 1, its best box: low-quality positive
        [100.0, 100.0, 120.0, 130.0],  # the same box again: taken too with gt_max_assign_all
    ])
    assigner = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3)
    assert assigner(boxes, gts).tolist() == [1, -1, 0, 2, 2]
    assert MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, gt_max_assign_all=False)(boxes, gts).tolist() == [1, -1, 0, 2, -1]
    assert MaxIoUAssigner(0.7, 0.3, match_low_quality=False)(boxes, gts).tolist() == [1, -1, 0, -1, -1]
    assert MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.4)(boxes, gts).tolist() == [1, -1, 0, -1, -1]
    # a neg range (0.1, 0.3) leaves a box touching nothing ignored rather than background
    assert MaxIoUAssigner(0.7, (0.1, 0.3), match_low_quality=False)(boxes, gts).tolist() == [1, -1, -1, -1, -1]
    ignore = torch.tensor([[45.0, 45.0, 58.0, 58.0]])  # covers 64 % of box 2
    assert MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, ignore_iof_thr=0.5)(boxes, gts, ignore).tolist() == [1, -1, -1, 2, 2]
    assert MaxIoUAssigner(0.7, 0.3, ignore_iof_thr=0.7)(boxes, gts, ignore).tolist()[2] == 0
    assert assigner(boxes, gts[:0]).tolist() == [0] * 5
    assert assigner(boxes[:0], gts).tolist() == []
    with pytest.raises(ValueError, match="neg_iou_thr"):
        MaxIoUAssigner(0.7, (0.1, 0.2, 0.3))


@pytest.mark.parametrize("settings", [
    dict(pos_thr=0.7, neg_thr=0.3, min_pos=0.3, low_quality=True, assign_all=True),
    dict(pos_thr=0.5, neg_thr=0.5, min_pos=0.5, low_quality=True, assign_all=False),
    dict(pos_thr=0.6, neg_thr=(0.1, 0.4), min_pos=0.0, low_quality=False, assign_all=True),
    dict(pos_thr=0.5, neg_thr=0.4, min_pos=0.2, low_quality=True, assign_all=True, ignore_thr=0.5),
])
def test_assigner_against_loops(settings):
    g = torch.Generator().manual_seed(3)
    for trial in range(4):
        gts = random_boxes(5 + trial, 200, 300, g, min_side=10)
        boxes = torch.cat([jitter(gts.repeat(6, 1), g, 0.3), random_boxes(40, 200, 300, g)])
        ignore = random_boxes(3, 200, 300, g, min_side=30)
        assigner = MaxIoUAssigner(settings["pos_thr"], settings["neg_thr"], settings["min_pos"], settings["low_quality"],
                                  settings["assign_all"], settings.get("ignore_thr", -1.0))
        expected = assign_ref(boxes, gts, ignore=ignore, **settings)
        got = assigner(boxes, gts, ignore).tolist()
        assert got == expected
        assert 0 in got and max(got) > 0 and (-1 in got or settings["pos_thr"] == settings["neg_thr"])


def test_sampler_by_hand_and_reproducible():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    labels = torch.tensor([4, 7])
    boxes = torch.arange(24, dtype=torch.float32).reshape(6, 4) + torch.tensor([0.0, 0.0, 5.0, 5.0])
    assigned = torch.tensor([1, 0, 0, -1, 2, 0])
    # with the gts added the candidates are gt0, gt1, box0..box5: positives 0, 1, 2, 6; negatives 3, 4, 7
    everything = RandomSampler(TAKE_ALL, 0.5)(assigned, boxes, gts, labels)
    assert everything.pos_inds.tolist() == [0, 1, 2, 6] and everything.neg_inds.tolist() == [3, 4, 7]
    assert everything.pos_is_gt.tolist() == [True, True, False, False]
    assert everything.pos_gt_inds.tolist() == [0, 1, 0, 1] and everything.pos_gt_labels.tolist() == [4, 7, 4, 7]
    torch.testing.assert_close(everything.pos_boxes, torch.cat([gts, boxes[[0, 4]]]))
    torch.testing.assert_close(everything.pos_gt_boxes, gts[[0, 1, 0, 1]])
    torch.testing.assert_close(everything.boxes, torch.cat([gts, boxes[[0, 4, 1, 2, 5]]]))
    no_gts = RandomSampler(TAKE_ALL, 0.5, add_gt_as_proposals=False)(assigned, boxes, gts)
    assert no_gts.pos_inds.tolist() == [0, 4] and no_gts.neg_inds.tolist() == [1, 2, 5] and no_gts.pos_gt_labels is None
    # 4 wanted at a quarter positive: 1 positive, 3 negatives; neg_pos_ub=1 leaves one negative
    sampler = RandomSampler(4, 0.25)
    draws = set()
    for seed in range(30):
        s = sampler(assigned, boxes, gts, labels, generator=torch.Generator().manual_seed(seed))
        again = sampler(assigned, boxes, gts, labels, generator=torch.Generator().manual_seed(seed))
        assert s.pos_inds.tolist() == again.pos_inds.tolist() and s.neg_inds.tolist() == again.neg_inds.tolist()
        assert len(s.pos_inds) == 1 and s.pos_inds.item() in (0, 1, 2, 6) and s.neg_inds.tolist() == [3, 4, 7]
        draws.add(s.pos_inds.item())
    assert draws == {0, 1, 2, 6}
    bounded = RandomSampler(4, 0.25, neg_pos_ub=1)(assigned, boxes, gts, labels, generator=torch.Generator().manual_seed(0))
    assert len(bounded.pos_inds) == 1 and len(bounded.neg_inds) == 1
    with pytest.raises(ValueError, match="gt_labels"):
        RandomSampler(4, 0.25)(assigned, boxes, gts)


def test_sampler_draws_as_mmdet():
    """Positives then negatives, each a randperm prefix of the candidates, sorted."""
    g = torch.Generator().manual_seed(5)
    assigned = torch.randint(-1, 4, (300,), generator=g)
    boxes, gts = random_boxes(300, 100, 100, g), random_boxes(3, 100, 100, g)
    got = RandomSampler(64, 0.25)(assigned, boxes, gts, torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(9))
    draw = torch.Generator().manual_seed(9)
    cands = [1, 2, 3] + assigned.tolist()
    pos = [i for i, a in enumerate(cands) if a > 0]
    pos = sorted(pos[i] for i in torch.randperm(len(pos), generator=draw)[:16].tolist())
    neg = [i for i, a in enumerate(cands) if a == 0]
    neg = sorted(neg[i] for i in torch.randperm(len(neg), generator=draw)[:64 - len(pos)].tolist())
    assert got.pos_inds.tolist() == pos and got.neg_inds.tolist() == neg


# ---- losses -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,allowed_border", [("l1", -1), ("smooth_l1", 0)])
def test_rpn_loss_against_loops(kind, allowed_border):
    strides = (4, 8, 16, 32, 64)
    rpn = RPNHead(8, 8, anchor_strides=strides)
    # the second image's own padded area (64 x 64) is narrower than the batch's
    padded, image_sizes = (64, 96), [(64, 90), (40, 56)]
    featmap_sizes = [(math.ceil(padded[0] / s), math.ceil(padded[1] / s)) for s in strides]
    g = torch.Generator().manual_seed(0)
    cls_maps = [torch.randn(2, 3, h, w, generator=g) for h, w in featmap_sizes]
    reg_maps = [torch.randn(2, 12, h, w, generator=g) * 0.3 for h, w in featmap_sizes]
    gts = [torch.tensor([[5.0, 8.0, 40.0, 50.0], [50.0, 10.0, 88.0, 30.0]]), torch.tensor([[2.0, 3.0, 20.0, 27.0]])]
    assigner, regression = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3), BoxRegressionLoss(kind, beta=1 / 9)
    got = rpn.loss(cls_maps, reg_maps, image_sizes, gts, assigner, RandomSampler(TAKE_ALL, 0.5, add_gt_as_proposals=False),
                   regression, allowed_border)
    anchors = anchors_ref(featmap_sizes, strides)
    anchors32 = torch.cat(rpn.anchor_generator(featmap_sizes))
    torch.testing.assert_close(anchors32.double(), torch.tensor([a[1] for a in anchors], dtype=torch.float64), rtol=0, atol=1e-5)
    cls_sum = reg_sum = 0.0
    count = 0
    for i, ((h, w), gt) in enumerate(zip(image_sizes, gts)):
        pad = (math.ceil(h / 32) * 32, math.ceil(w / 32) * 32)
        keep = []
        for stride, box, (y, x) in anchors:
            ok = y < math.ceil(pad[0] / stride) and x < math.ceil(pad[1] / stride)
            if allowed_border >= 0:
                ok &= box[0] >= -allowed_border and box[1] >= -allowed_border and box[2] < w + allowed_border and box[3] < h + allowed_border
            keep.append(ok)
        rows = [j for j, ok in enumerate(keep) if ok]
        assigned = assign_ref(anchors32[rows], gt, 0.7, 0.3, 0.3, True, True, iou=iou32)
        logits = torch.cat([m[i].permute(1, 2, 0).reshape(-1) for m in cls_maps]).double().tolist()
        deltas = torch.cat([m[i].permute(1, 2, 0).reshape(-1, 4) for m in reg_maps]).double().tolist()
        npos = nneg = 0
        for j, a in zip(rows, assigned):
            if a > 0:
                cls_sum += bce(logits[j], 1.0)
                reg_sum += reg_ref(deltas[j], encode_ref(anchors[j][1], gt[a - 1].double().tolist(), (1,) * 4), kind, 1 / 9)
                npos += 1
            elif a == 0:
                cls_sum += bce(logits[j], 0.0)
                nneg += 1
        assert npos > 0 and nneg > 0
        count += max(npos, 1) + max(nneg, 1)
    assert got["loss_rpn_cls"].item() == pytest.approx(cls_sum / count, rel=1e-5)
    assert got["loss_rpn_bbox"].item() == pytest.approx(reg_sum / count, rel=1e-4)
    with pytest.raises(ValueError, match="add_gt_as_proposals"):
        rpn.loss(cls_maps, reg_maps, image_sizes, gts, assigner, RandomSampler(256, 0.5), regression)


def sampled_rois(num_classes, g):
    """Two images' sampling results over jittered gts plus random proposals, everything kept."""
    samples = []
    for n, (h, w) in ((3, (120, 160)), (2, (90, 100))):
        gts = random_boxes(n, h, w, g, min_side=12)
        gts[0, :2] = torch.tensor([-6.0, -4.0])  # partly outside the image and its mask: clipped mask targets
        proposals = torch.cat([jitter(gts.repeat(4, 1), g, 0.2), random_boxes(10, h, w, g) - 8])
        labels = torch.randint(0, num_classes, (n,), generator=g)
        assigned = MaxIoUAssigner(0.5, 0.5, min_pos_iou=0.5)(proposals, gts)
        samples.append(RandomSampler(TAKE_ALL, 0.25)(assigned, proposals, gts, labels))
    return samples


@pytest.mark.parametrize("kind,agnostic", [("l1", False), ("smooth_l1", True), ("giou", False)])
def test_box_head_loss_against_loops(kind, agnostic):
    num_classes, stds = 4, STDS[1]
    head = ConvFCBBoxHead(in_channels=4, num_classes=num_classes, fc_out_channels=8, reg_class_agnostic=agnostic, target_stds=stds)
    g = torch.Generator().manual_seed(1)
    samples = sampled_rois(num_classes, g)
    k = sum(s.boxes.shape[0] for s in samples)
    logits = torch.randn(k, num_classes + 1, generator=g)
    deltas = torch.randn(k, 4 if agnostic else 4 * num_classes, generator=g) * 0.5
    regression = BoxRegressionLoss(kind, weight=10.0 if kind == "giou" else 1.0)
    got = head.loss(logits, deltas, samples, regression)
    cls_sum = reg_sum = 0.0
    row = 0
    for s in samples:
        labels = s.pos_gt_labels.tolist() + [num_classes] * s.neg_boxes.shape[0]
        for j, (box, label) in enumerate(zip(s.boxes.double().tolist(), labels)):
            z = logits[row].double().tolist()
            cls_sum += math.log(sum(math.exp(v) for v in z)) - z[label]
            if label < num_classes:
                d = deltas[row].double().tolist()
                d = d[:4] if agnostic else d[4 * label: 4 * label + 4]
                gt = s.pos_gt_boxes[j].double().tolist()
                if kind == "giou":
                    reg_sum += regression.weight * reg_ref(decode_ref(box, d, stds), gt, kind)
                else:
                    reg_sum += reg_ref(d, encode_ref(box, gt, stds), kind)
            row += 1
    assert sum(len(s.pos_inds) for s in samples) > 3
    assert got["loss_cls"].item() == pytest.approx(cls_sum / k, rel=1e-5)
    assert got["loss_bbox"].item() == pytest.approx(reg_sum / k, rel=1e-4)


@pytest.mark.parametrize("agnostic", [False, True])
def test_mask_loss_against_loops(agnostic):
    num_classes, size = 3, 8
    g = torch.Generator().manual_seed(2)
    samples = sampled_rois(num_classes, g)
    # masks in each image's padded frame; some positives reach past them and are clipped
    gt_masks = [torch.rand(s.pos_gt_inds.max().item() + 1, h, w, generator=g) > 0.4
                for s, (h, w) in zip(samples, ((112, 150), (80, 96)))]
    head = FCNMaskHead(in_channels=4, num_classes=num_classes, num_convs=1, conv_out_channels=4, class_agnostic=agnostic)
    k = sum(len(s.pos_inds) for s in samples)
    logits = torch.randn(k, 1 if agnostic else num_classes, size, size, generator=g)
    got = head.loss(logits, samples, gt_masks)
    total, row = 0.0, 0
    for s, masks in zip(samples, gt_masks):
        h, w = masks.shape[-2:]
        for box, gt, label in zip(s.pos_boxes.double().tolist(), s.pos_gt_inds.tolist(), s.pos_gt_labels.tolist()):
            box = [min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w), min(max(box[3], 0), h)]
            target = ref.roi_align_loops(masks[gt][None].double(), box, 1, size)[0] >= 0.5
            z = logits[row, 0 if agnostic else label].double()
            total += sum(bce(v, float(t)) for v, t in zip(z.flatten().tolist(), target.flatten().tolist()))
            row += 1
    assert got.item() == pytest.approx(total / (k * size * size), rel=1e-5)
    targets = mask_targets(samples, gt_masks, size)
    assert targets.shape == (k, size, size) and 0 < targets.mean() < 1


# ---- whole heads ---------------------------------------------------------------------------------


def make_heads(cascade, num_classes=3, ch=8):
    box = dict(in_channels=ch, num_classes=num_classes, conv_out_channels=ch, fc_out_channels=16)
    mask = dict(in_channels=ch, num_classes=num_classes, num_convs=2, conv_out_channels=ch)
    if cascade:
        roi = dict(type="CascadeRoIHeads", mask_heads=[mask] * 3,
                   bbox_heads=[dict(box, num_shared_convs=2, num_shared_fcs=1, norm=True, target_stds=s) for s in STDS])
    else:
        roi = dict(type="RoIHeads", bbox_head=box, mask_head=mask)
    return TwoStageDetectorHeads(dict(type="FPN", in_channels=[6] * 4, out_channels=ch, num_outs=5),
                                 dict(in_channels=ch, feat_channels=ch), roi)


def scene(padded, image_sizes, seed=0):
    """A fixed random pyramid and per image 2-3 boxes with masks (filled ellipses), in the batch's pixels."""
    g = torch.Generator().manual_seed(seed)
    pyramid = [torch.randn(len(image_sizes), 6, padded[0] // s, padded[1] // s, generator=g) for s in (4, 8, 16, 32)]
    targets = []
    for n, (h, w) in zip((3, 2), image_sizes):
        boxes = random_boxes(n, h * 0.6, w * 0.6, g, min_side=16).minimum(torch.tensor([w, h, w, h]) - 1.0)
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        masks = torch.stack([((xx - (b[0] + b[2]) / 2) / ((b[2] - b[0]) / 2)) ** 2 + ((yy - (b[1] + b[3]) / 2) / ((b[3] - b[1]) / 2)) ** 2 <= 1
                             for b in boxes])
        targets.append({"boxes": boxes, "labels": torch.randint(0, 3, (n,), generator=g), "masks": masks})
    return pyramid, targets


@pytest.mark.parametrize("cascade", [False, True])
def test_gradients_reach_every_parameter(cascade):
    torch.manual_seed(0)
    heads = make_heads(cascade).train()
    # large enough that anchors of every level lie inside the images (the cascade's allowed_border is 0)
    pyramid, targets = scene((320, 352), [(320, 352), (300, 330)])
    losses = detector_losses(heads, pyramid, [(320, 352), (300, 330)], targets, generator=torch.Generator().manual_seed(0))
    names = {"loss_rpn_cls", "loss_rpn_bbox"} | ({f"s{k}.{t}" for k in range(3) for t in ("loss_cls", "loss_bbox", "loss_mask")}
                                                 if cascade else {"loss_cls", "loss_bbox", "loss_mask"})
    assert set(losses) == names and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in heads.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_cascade_stage_weights_and_refinement():
    torch.manual_seed(1)
    heads = make_heads(True).eval()  # BatchNorm in eval mode: each RoI's outputs depend on it alone
    image_sizes = [(128, 160), (100, 120)]
    pyramid, targets = scene((128, 160), image_sizes, seed=1)
    features = heads.neck(pyramid)
    g = torch.Generator().manual_seed(0)
    proposals = [torch.cat([jitter(t["boxes"].repeat(5, 1), g, 0.3), random_boxes(20, h, w, g)]).clamp(min=0)
                 for t, (h, w) in zip(targets, image_sizes)]
    thresholds = (0.5, 0.6, 0.7)
    stages = [StageTraining(MaxIoUAssigner(t, t, t, match_low_quality=False), RandomSampler(TAKE_ALL, 0.25),
                            BoxRegressionLoss("giou", weight=10.0), 1.0) for t in thresholds]
    outputs, rois_in = [], []
    hooks = [h.register_forward_hook(lambda m, args, out: outputs.append(out)) for h in heads.roi_head.bbox_heads]
    hooks.append(heads.roi_head.bbox_roi_extractor.register_forward_hook(lambda m, args, out: rois_in.append(args[1])))
    unit = roi_losses(heads, features, proposals, image_sizes, targets, stages)
    for h in hooks:
        h.remove()
    weighted = roi_losses(heads, features, proposals, image_sizes, targets,
                          [StageTraining(s.assigner, s.sampler, s.regression, w) for s, w in zip(stages, (1.0, 0.5, 0.25))])
    assert set(weighted) == set(unit)
    for name, value in unit.items():
        assert weighted[name].item() == pytest.approx(value.item() * {"s0": 1.0, "s1": 0.5, "s2": 0.25}[name[:2]], rel=1e-5)
    # each stage samples its image's gts, then the positives, then the negatives among its candidates;
    # the next stage's candidates are the non-gt ones moved by the deltas of their target class (of the
    # best foreground class for negatives) and clipped to the image
    candidates = [p.double() for p in proposals]
    for k, (logits, deltas) in enumerate(outputs):
        rois = rois_in[k]
        refined = []
        for i, (t, size, cands) in enumerate(zip(targets, image_sizes, candidates)):
            rows = (rois[:, 0] == i).nonzero().squeeze(1).tolist()
            n = len(t["boxes"])
            assigned = assign_ref(cands, t["boxes"], thresholds[k], thresholds[k], thresholds[k], False, True)
            order = [j for j, a in enumerate(assigned) if a > 0] + [j for j, a in enumerate(assigned) if a == 0]
            assert len(rows) == n + len(order) and (k > 0 or 0 < sum(a > 0 for a in assigned) < len(order))
            torch.testing.assert_close(rois[rows[:n], 1:], t["boxes"])
            torch.testing.assert_close(rois[rows[n:], 1:].double(), cands[order], rtol=0, atol=1e-3)
            moved = []
            for r, j in zip(rows[n:], order):
                a = assigned[j]
                label = int(t["labels"][a - 1]) if a > 0 else max(range(3), key=lambda c: logits[r, c].item())
                moved.append(ref.decode(rois[r, 1:].double().tolist(), deltas[r, 4 * label: 4 * label + 4].double().tolist(), STDS[k], size))
            refined.append(torch.tensor(moved, dtype=torch.float64))
        if k + 1 < len(outputs):
            # the next stage's input, compared as sets of boxes (its own sampling reorders them)
            nxt = rois_in[k + 1]
            candidates = [nxt[nxt[:, 0] == i][len(t["boxes"]):, 1:].double() for i, t in enumerate(targets)]
            for got, want in zip(candidates, refined):
                distance, match = torch.cdist(want, got).min(dim=1)
                assert len(got) == len(want) and sorted(match.tolist()) == list(range(len(got))) and distance.max() < 1e-3
    assert all(len(o[0]) > 0 for o in outputs)


def test_training_loss_goes_down():
    torch.manual_seed(0)
    heads = make_heads(False).train()
    image_sizes = [(96, 128), (80, 100)]
    pyramid, targets = scene((96, 128), image_sizes, seed=2)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(150):
        losses = detector_losses(heads, pyramid, image_sizes, targets, generator=g)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append({name: value.item() for name, value in losses.items()})
    first = {name: sum(h[name] for h in history[:10]) / 10 for name in history[0]}
    last = {name: sum(h[name] for h in history[-10:]) / 10 for name in history[0]}
    assert sum(last.values()) < 0.25 * sum(first.values()), (first, last)
    assert all(last[name] < first[name] for name in first), (first, last)


def test_training_settings_and_bad_targets():
    cascade = cascade_mask_rcnn_training()
    assert [s.weight for s in cascade.stages] == [1.0, 0.5, 0.25]
    assert [s.assigner.pos_iou_thr for s in cascade.stages] == [0.5, 0.6, 0.7]
    assert cascade.rpn.allowed_border == 0 and cascade.rpn.regression == BoxRegressionLoss("smooth_l1", beta=1 / 9)
    assert all(s.regression.decoded for s in cascade.stages)
    plain = mask_rcnn_training()
    assert isinstance(plain, DetectorTraining) and plain.rpn.allowed_border == -1 and not plain.stages[0].regression.decoded
    heads = make_heads(False)
    pyramid, targets = scene((64, 64), [(64, 64), (60, 50)])
    bad_labels = [dict(t, labels=t["labels"] + 3) for t in targets]
    with pytest.raises(ValueError, match="labels"):
        detector_losses(heads, pyramid, [(64, 64), (60, 50)], bad_labels)
    with pytest.raises(ValueError, match="masks"):
        detector_losses(heads, pyramid, [(64, 64), (60, 50)], [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    with pytest.raises(ValueError, match="one dict per image"):
        detector_losses(heads, pyramid, [(64, 64), (60, 50)], targets[:1])
    with pytest.raises(ValueError, match="stage settings"):
        detector_losses(heads, pyramid, [(64, 64), (60, 50)], targets, cascade)
    with pytest.raises(ValueError, match="kind"):
        BoxRegressionLoss("iou")
