"""Detector parts on inputs the fixtures cannot reach (RoIs on all four levels, other class counts,
batches of different sizes, large masks) against tests/detection_reference.py, an independent plain
re-derivation of upstream's rules."""
import pytest
import torch

import detection_reference as ref
from vitadapter.detection import CascadeRoIHeads, RoIHeads, RoIPooler, map_roi_levels, paste_masks

STRIDES = (4, 8, 16, 32)
PAD = (512, 640)


def random_boxes(n, image_size, min_side=6.0, max_side=900.0, generator=None):
    """Boxes whose sides spread log-uniformly from ``min_side`` to ``max_side``, partly outside the image."""
    h, w = image_size
    side = torch.exp(torch.empty(n, 2).uniform_(torch.log(torch.tensor(min_side)).item(), torch.log(torch.tensor(max_side)).item(), generator=generator))
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([w, h])
    boxes = torch.cat([centre - side / 2, centre + side / 2], 1)
    return boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h], dtype=torch.float32))


def pyramid(channels, batch=2, generator=None):
    return [torch.randn(batch, channels, PAD[0] // s, PAD[1] // s, generator=generator) for s in STRIDES]


def away_from_level_boundaries(boxes):
    wh = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    x = torch.log2(wh.double().sqrt() / 56 + 1e-6)
    return (x - x.round()).abs() > 1e-4


def test_level_mapping_reaches_every_level():
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(400, PAD, generator=g)
    boxes = boxes[away_from_level_boundaries(boxes)]
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)
    levels = map_roi_levels(rois, 4)
    expected = torch.tensor([ref.roi_level(b) for b in boxes.tolist()])
    assert torch.equal(levels, expected)
    assert set(levels.tolist()) == {0, 1, 2, 3}


def test_roi_align_at_every_level():
    """RoIPooler (routing, scale, aligned=True, adaptive grid) vs mmcv's RoIAlign transcribed sample by sample."""
    g = torch.Generator().manual_seed(2)
    feats = pyramid(3, batch=2, generator=g)
    boxes = random_boxes(40, PAD, min_side=20, generator=g)
    boxes = boxes[away_from_level_boundaries(boxes)]
    picked = torch.cat([torch.nonzero(torch.tensor([ref.roi_level(b) for b in boxes.tolist()]) == lvl).flatten()[:2] for lvl in range(4)])
    boxes = boxes[picked]
    assert sorted({ref.roi_level(b) for b in boxes.tolist()}) == [0, 1, 2, 3]
    rois = torch.cat([torch.arange(len(boxes)).remainder(2).float()[:, None], boxes], 1)
    for size in (7, 14):
        got = RoIPooler(size, STRIDES)(feats, rois)
        for roi, out in zip(rois.tolist(), got):
            level = ref.roi_level(roi[1:])
            want = ref.roi_align_loops(feats[level][int(roi[0])], roi[1:], STRIDES[level], size)
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def make_heads(cascade, num_classes, seed):
    torch.manual_seed(seed)
    box = dict(in_channels=8, num_classes=num_classes, conv_out_channels=8, fc_out_channels=16)
    mask = dict(in_channels=8, num_classes=num_classes, num_convs=2, conv_out_channels=8)
    common = dict(score_thr=0.05, iou_threshold=0.5, max_per_img=30)
    if cascade:
        stds = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
        heads = CascadeRoIHeads(
            [dict(box, num_shared_convs=4, num_shared_fcs=1, norm=True, target_stds=s) for s in stds], [mask] * 3, **common
        )
    else:
        heads = RoIHeads(dict(box, num_shared_fcs=2), mask, **common)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            # larger deltas than an untrained head's, so the cascade moves boxes across levels
            p.copy_(torch.randn_like(p) * (0.5 if "fc_reg" in name else 1.0) / max(p[0].numel(), 1) ** 0.5)
        for m in heads.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return heads.eval()


@pytest.mark.parametrize("cascade,num_classes", [(True, 5), (False, 3)])
def test_roi_stage_against_reference(cascade, num_classes):
    """Two images of different sizes (one downscaled, one upscaled from the original), RoIs on every
    level: per-stage RoIs and logits, final boxes, scores, labels, masks."""
    g = torch.Generator().manual_seed(3)
    heads = make_heads(cascade, num_classes, seed=4)
    feats = pyramid(8, generator=g)
    image_sizes = [(512, 640), (448, 600)]
    original_sizes = [(341, 427), (600, 800)]
    # plus one box per image large enough for the stride-32 level (sqrt(wh) >= 448)
    proposals = [torch.cat([random_boxes(24, (h, w), min_side=12, generator=g), torch.tensor([[10.0, 5.0, w - 3.0, h - 9.0]])])
                 for h, w in image_sizes]
    with torch.no_grad():
        got = heads(feats, proposals, image_sizes, original_sizes)
        stages = heads.stage_outputs(feats, torch.cat([torch.cat([torch.full((len(p), 1), float(i)), p], 1) for i, p in enumerate(proposals)]), image_sizes)
        want = ref.roi_stage(heads, feats, proposals, image_sizes, original_sizes)
    levels = {ref.roi_level(r[1:]) for rois, _, _ in stages for r in rois.tolist()}
    assert levels == {0, 1, 2, 3}
    offset = 0
    for res, exp, original in zip(got, want, original_sizes):
        n = len(exp["stages"][0][0])
        for (rois, logits, _), (want_rois, want_logits) in zip(stages, exp["stages"]):
            torch.testing.assert_close(rois[offset: offset + n].double(), want_rois, rtol=0, atol=1e-3)
            torch.testing.assert_close(logits[offset: offset + n].double(), want_logits, rtol=1e-4, atol=1e-4)
        offset += n
        assert len(exp["labels"]) > 3
        assert torch.equal(res["labels"], exp["labels"])
        torch.testing.assert_close(res["boxes"].double(), exp["boxes"], rtol=0, atol=1e-4 * max(original))
        torch.testing.assert_close(res["scores"].double(), exp["scores"], rtol=0, atol=1e-5)
        assert res["masks"].shape == (len(exp["labels"]), *original)
        decided = (exp["probs"] - 0.5).abs() > 1e-5
        assert torch.equal(res["masks"][decided], exp["masks"][decided])
        assert exp["masks"].any() and not exp["masks"].all()


def test_mask_paste_large_small_and_clipped_boxes():
    """Boxes far wider than 56 px (the bilinear fringe leaves the +-1 px window), tiny ones, ones
    crossing the image border, against a full-image explicit bilinear paste."""
    g = torch.Generator().manual_seed(5)
    image = (300, 420)
    boxes = torch.tensor([[10.3, 20.7, 380.2, 290.1], [-30.0, -12.5, 150.0, 90.0], [200.0, 150.0, 460.0, 330.0],
                          [50.2, 60.7, 51.1, 70.3], [100.0, 100.0, 100.4, 100.3], [0.0, 0.0, 420.0, 300.0]])
    logits = torch.randn(len(boxes), 28, 28, generator=g) * 3
    probs = logits.sigmoid()
    got = paste_masks(probs, boxes, image, 0.5)
    for p, box, mask in zip(probs, boxes.tolist(), got):
        value, want = ref.paste(p, box, image, 0.5)
        decided = (value - 0.5).abs() > 1e-5
        assert torch.equal(mask[decided], want[decided])
    assert got.any(dim=(1, 2))[:3].all()


def test_images_without_proposals():
    """An image the RPN left empty gets empty, well-typed results; the other image is unaffected."""
    heads = make_heads(True, 5, seed=4)
    g = torch.Generator().manual_seed(6)
    feats = pyramid(8, generator=g)
    sizes, originals = [(512, 640), (448, 600)], [(341, 427), (600, 800)]
    boxes = random_boxes(10, sizes[1], min_side=12, generator=g)
    with torch.no_grad():
        empty, full = heads(feats, [torch.zeros(0, 5), boxes], sizes, originals)
        alone = heads(feats, [boxes[:0], boxes], sizes, originals)[1]
        none = heads(feats, [torch.zeros(0, 5), torch.zeros(0, 5)], sizes, originals)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64
    assert empty["masks"].shape == (0, *originals[0]) and empty["masks"].dtype == torch.bool
    assert len(full["labels"]) > 0 and torch.equal(full["labels"], alone["labels"])
    assert all(r["boxes"].shape == (0, 4) and r["masks"].shape[0] == 0 for r in none)
