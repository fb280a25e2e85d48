"""HTC training (mmdet 2.22's ``HybridTaskCascadeRoIHead.forward_train`` as upstream's HTC++ configs set
it): the semantic loss and every stage's box and mask losses against float64 re-derivations written
here RoI by RoI (assignment, refinement, semantic fusion, mask information flow), plus the properties
training needs: gradients reach every head parameter and a few dozen steps drive the loss down."""
import math

import pytest
import torch
import torch.nn.functional as F

import detection_reference as ref
from test_detection_training import STDS, TAKE_ALL, assign_ref, bce, encode_ref, jitter, random_boxes, reg_ref, scene
from vitadapter.detection import TwoStageDetectorHeads
from vitadapter.detection.assigner import MaxIoUAssigner
from vitadapter.detection.box_losses import BoxRegressionLoss
from vitadapter.detection.htc_roi_heads import HTCRoIHeads
from vitadapter.detection.sampler import RandomSampler
from vitadapter.detection.semantic_head import FusedSemanticHead
from vitadapter.detection.training import (
    HTCTraining, StageTraining, default_training, detector_losses, htc_roi_losses, htc_training, mask_rcnn_training,
    semantic_targets,
)

CH, CLASSES, SEM_CLASSES = 8, 3, 5
THRESHOLDS = (0.5, 0.6, 0.7)


def htc_roi_kwargs(roi=4, semantic_roi=8):
    box = dict(in_channels=CH, num_classes=CLASSES, roi_feat_size=roi, num_shared_convs=1, num_shared_fcs=1,
               conv_out_channels=CH, fc_out_channels=16, reg_class_agnostic=True)
    mask = dict(in_channels=CH, conv_out_channels=CH, num_classes=CLASSES, num_convs=1)
    return dict(
        bbox_heads=[dict(box, target_stds=s) for s in STDS],
        mask_heads=[dict(mask, with_conv_res=k > 0) for k in range(3)],
        semantic_head=dict(num_ins=5, fusion_level=1, num_convs=1, in_channels=CH, conv_out_channels=CH, num_classes=SEM_CLASSES),
        bbox_roi_extractor=dict(output_size=roi), mask_roi_extractor=dict(output_size=roi), semantic_roi_size=semantic_roi,
    )


def make_htc_heads():
    return TwoStageDetectorHeads(dict(type="FPN", in_channels=[6] * 4, out_channels=CH, num_outs=5),
                                 dict(in_channels=CH, feat_channels=CH), dict(type="HTCRoIHeads", **htc_roi_kwargs()))


def with_semantic(targets, image_sizes, g, drop=None):
    """Per image a random class map (some pixels unlabelled, 255) over its own size, except image ``drop``."""
    out = []
    for i, (t, (h, w)) in enumerate(zip(targets, image_sizes)):
        semantic = torch.randint(0, SEM_CLASSES, (h, w), generator=g)
        semantic[torch.rand(h, w, generator=g) < 0.2] = 255
        out.append(t if i == drop else dict(t, semantic=semantic))
    return out


# ---- the semantic branch ---------------------------------------------------------------------------


def test_semantic_targets_and_loss_against_loops():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randint(0, SEM_CLASSES, (37, 45), generator=g), None, torch.randint(0, SEM_CLASSES, (80, 70), generator=g)]
    maps[0][torch.rand(37, 45, generator=g) < 0.3] = 255
    size, stride = (6, 7), 8
    labels = semantic_targets([{} if m is None else {"semantic": m} for m in maps], size, stride, 255)
    for b, m in enumerate(maps):
        for i in range(size[0]):
            for j in range(size[1]):
                # mmdet's SegRescale: nearest neighbour of the padded map, the padding unlabelled
                want = 255 if m is None or i * stride >= m.shape[0] or j * stride >= m.shape[1] else int(m[i * stride, j * stride])
                assert labels[b, i, j].item() == want
    assert semantic_targets([{}, {}], size, stride, 255) is None

    head = FusedSemanticHead(num_ins=2, fusion_level=0, num_convs=1, in_channels=4, conv_out_channels=4, num_classes=SEM_CLASSES)
    logits = torch.randn(3, SEM_CLASSES, *size, generator=g)
    total = 0.0
    for b in range(3):
        for i in range(size[0]):
            for j in range(size[1]):
                c = int(labels[b, i, j])
                if c != 255:
                    z = logits[b, :, i, j].double().tolist()
                    total += math.log(sum(math.exp(v) for v in z)) - z[c]
    assert 0 < (labels == 255).float().mean() < 1
    # divided by every pixel, the unlabelled ones included (mmdet's avg_non_ignore=False)
    assert head.loss(logits, labels).item() == pytest.approx(total / labels.numel(), rel=1e-6)
    with pytest.raises(ValueError, match="labels"):
        head.loss(logits, labels.clamp(max=SEM_CLASSES))


# ---- the interleaved cascade -------------------------------------------------------------------------


def conv1x1_relu(unit, x):
    return F.conv2d(x, unit.conv.weight.double(), unit.conv.bias.double()).clamp(min=0)


def htc_mask_features(head, x, res):
    """An HTCMaskHead's last conv feature in float64: its input plus ReLU(conv_res(res)), then its convs."""
    if res is not None:
        x = x + conv1x1_relu(head.conv_res, res)
    for unit in head.convs:
        x = ref._conv_unit(unit, x)
    return x


def fused(pooled, semantic, rois, stride, roi):
    """RoI features plus the semantic map RoIAligned at 8 x 8 and averaged down to ``roi`` x ``roi``."""
    sem = torch.stack([ref.roi_align_loops(semantic[int(r[0])], r[1:].tolist(), stride, 8) for r in rois])
    return pooled + F.avg_pool2d(sem, 8 // roi)


def test_htc_stage_losses_against_loops():
    torch.manual_seed(3)
    heads = make_htc_heads().eval()
    roi_head = heads.roi_head
    image_sizes = [(128, 160), (100, 120)]
    pyramid, targets = scene((128, 160), image_sizes, seed=1)
    g = torch.Generator().manual_seed(0)
    targets = with_semantic(targets, image_sizes, g, drop=1)
    features = heads.neck(pyramid)
    proposals = [torch.cat([jitter(t["boxes"].repeat(5, 1), g, 0.3), random_boxes(12, h, w, g)]).clamp(min=0)
                 for t, (h, w) in zip(targets, image_sizes)]
    training = HTCTraining(stages=[StageTraining(MaxIoUAssigner(t, t, t, match_low_quality=True), RandomSampler(TAKE_ALL, 0.25),
                                                 BoxRegressionLoss("smooth_l1", beta=1.0), w)
                                   for t, w in zip(THRESHOLDS, (1.0, 0.5, 0.25))])
    got = htc_roi_losses(roi_head, features, proposals, image_sizes, targets, training)

    with torch.no_grad():
        sem_logits, semantic = roi_head.semantic_head(features)
    semantic = semantic.double()
    feats64 = [f.detach().double() for f in features]
    want = {}
    labels = semantic_targets(targets, sem_logits.shape[-2:], 8, 255)
    want["loss_semantic_seg"] = 0.2 * F.cross_entropy(sem_logits.double(), labels, ignore_index=255, reduction="sum").item() / labels.numel()

    def sampled(cands, k):
        """Per image: gts, then the candidates assigned positive, then the negatives; their gt indices."""
        rows, gt_of = [], []
        for i, (t, c) in enumerate(zip(targets, cands)):
            assigned = assign_ref(c, t["boxes"].double(), THRESHOLDS[k], THRESHOLDS[k], THRESHOLDS[k], True, True)
            order = [j for j, a in enumerate(assigned) if a > 0] + [j for j, a in enumerate(assigned) if a == 0]
            boxes = torch.cat([t["boxes"].double(), c[order]])
            rows.append(torch.cat([torch.full((len(boxes), 1), float(i), dtype=torch.float64), boxes], 1))
            gt_of.append(list(range(len(t["boxes"]))) + [assigned[j] - 1 for j in order])
        return rows, gt_of

    cands = [p.double() for p in proposals]
    for k, stage_weight in enumerate((1.0, 0.5, 0.25)):
        bbox_head = roi_head.bbox_heads[k]
        rows, gt_of = sampled(cands, k)
        rois = torch.cat(rows)
        logits, deltas = ref.box_head(bbox_head, fused(ref.pool(feats64, rois, 4), semantic, rois, 8, 4))
        cls_sum = reg_sum = 0.0
        refined, r = [], 0
        for i, (t, gts) in enumerate(zip(targets, gt_of)):
            moved = []
            for n, gi in enumerate(gts):
                box = rois[r, 1:].tolist()
                label = int(t["labels"][gi]) if gi >= 0 else CLASSES
                z = logits[r].tolist()
                cls_sum += math.log(sum(math.exp(v) for v in z)) - z[label]
                if gi >= 0:
                    reg_sum += reg_ref(deltas[r].tolist(), encode_ref(box, t["boxes"][gi].double().tolist(), STDS[k]), "smooth_l1")
                if n >= len(t["boxes"]):  # the added gts are not refined
                    moved.append(ref.decode(box, deltas[r].tolist(), STDS[k], image_sizes[i]))
                r += 1
            refined.append(torch.tensor(moved, dtype=torch.float64))
        want[f"s{k}.loss_cls"] = stage_weight * cls_sum / len(rois)
        want[f"s{k}.loss_bbox"] = stage_weight * reg_sum / len(rois)
        # the mask branch learns on the refined boxes, assigned again at this stage's threshold
        cands = refined
        rows, gt_of = sampled(cands, k)
        pos_rows = [rw[[n for n, gi in enumerate(gts) if gi >= 0]] for rw, gts in zip(rows, gt_of)]
        pos_rois = torch.cat(pos_rows)
        x = fused(ref.pool(feats64, pos_rois, 4), semantic, pos_rois, 8, 4)
        last = None
        for earlier in roi_head.mask_heads[:k]:
            last = htc_mask_features(earlier, x, last)
        head = roi_head.mask_heads[k]
        out = htc_mask_features(head, x, last)
        out = F.conv_transpose2d(out, head.upsample.weight.double(), head.upsample.bias.double(), stride=2).clamp(min=0)
        out = F.conv2d(out, head.conv_logits.weight.double(), head.conv_logits.bias.double())
        total, r = 0.0, 0
        for t, gts in zip(targets, gt_of):
            h, w = t["masks"].shape[-2:]
            for gi in (gi for gi in gts if gi >= 0):
                box = pos_rois[r, 1:].tolist()
                box = [min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w), min(max(box[3], 0), h)]
                target = ref.roi_align_loops(t["masks"][gi][None].double(), box, 1, 8)[0] >= 0.5
                z = out[r, int(t["labels"][gi])]
                total += sum(bce(v, float(m)) for v, m in zip(z.flatten().tolist(), target.flatten().tolist()))
                r += 1
        want[f"s{k}.loss_mask"] = stage_weight * total / (r * 64)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].item() == pytest.approx(value, rel=1e-4, abs=1e-7), name
    assert all(v > 0 for v in want.values())


# ---- the whole heads -----------------------------------------------------------------------------------


def test_gradients_reach_every_htc_parameter():
    torch.manual_seed(0)
    heads = make_htc_heads().train()
    image_sizes = [(320, 352), (300, 330)]
    pyramid, targets = scene((320, 352), image_sizes)
    targets = with_semantic(targets, image_sizes, torch.Generator().manual_seed(1))
    losses = detector_losses(heads, pyramid, image_sizes, targets, generator=torch.Generator().manual_seed(0))
    names = {"loss_rpn_cls", "loss_rpn_bbox", "loss_semantic_seg"} | {f"s{k}.{t}" for k in range(3) for t in ("loss_cls", "loss_bbox", "loss_mask")}
    assert set(losses) == names and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in heads.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    # without semantic maps the semantic loss is left out; the semantic branch still learns through the fusion
    heads.zero_grad()
    plain = [{k: v for k, v in t.items() if k != "semantic"} for t in targets]
    losses = detector_losses(heads, pyramid, image_sizes, plain, generator=torch.Generator().manual_seed(0))
    assert set(losses) == names - {"loss_semantic_seg"}
    sum(losses.values()).backward()
    assert heads.roi_head.semantic_head.conv_embedding.conv.weight.grad.abs().sum() > 0


def test_htc_training_loss_goes_down():
    torch.manual_seed(0)
    heads = make_htc_heads().train()
    image_sizes = [(96, 128), (80, 100)]
    pyramid, targets = scene((96, 128), image_sizes, seed=2)
    targets = with_semantic(targets, image_sizes, torch.Generator().manual_seed(3))
    training = htc_training()
    training.rpn.allowed_border = -1  # the anchors of the coarse levels reach past these small images
    optimizer = torch.optim.AdamW(heads.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(40):
        losses = detector_losses(heads, pyramid, image_sizes, targets, training, generator=g)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append(sum(v.item() for v in losses.values()))
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_htc_settings_and_bad_inputs():
    htc = htc_training()
    assert [s.weight for s in htc.stages] == [1.0, 0.5, 0.25]
    assert [s.assigner.pos_iou_thr for s in htc.stages] == [0.5, 0.6, 0.7]
    assert all(s.assigner.match_low_quality and s.regression == BoxRegressionLoss("smooth_l1", beta=1.0) for s in htc.stages)
    assert htc.rpn.allowed_border == 0 and htc.rpn.regression == BoxRegressionLoss("smooth_l1", beta=1 / 9)
    assert (htc.semantic_weight, htc.semantic_ignore_index) == (0.2, 255)
    assert all(s.regression == BoxRegressionLoss("giou", weight=10.0) for s in htc_training(giou=True).stages)
    heads = make_htc_heads()
    assert isinstance(default_training(heads), HTCTraining)
    image_sizes = [(64, 64), (60, 50)]
    pyramid, targets = scene((64, 64), image_sizes)
    with pytest.raises(TypeError, match="HTCTraining"):
        detector_losses(heads, pyramid, image_sizes, targets, mask_rcnn_training())
    with pytest.raises(ValueError, match="semantic"):
        detector_losses(heads, pyramid, image_sizes, [dict(t, semantic=torch.zeros(3, 64, 64)) for t in targets])
    assert isinstance(heads.roi_head, HTCRoIHeads)
