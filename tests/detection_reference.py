"""An independent plain re-derivation of mmdet 2.x's test-time rules for the RoI stage (level mapping,
mmcv RoIAlign, cascade refinement, scoring, per-class NMS, rescale, mask pasting), written per box and
per sample with Python loops and float64 instead of the package's batched code. Only
``torchvision.ops.roi_align`` is shared, and ``roi_align_loops`` checks it separately."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

MAX_LOG_RATIO = abs(math.log(0.016))


def roi_level(box, num_levels=4, finest_scale=56.0):
    w, h = box[2] - box[0], box[3] - box[1]
    return min(max(math.floor(math.log2(math.sqrt(w * h) / finest_scale + 1e-6)), 0), num_levels - 1)


def _bilinear(feat, y, x):
    """mmcv's RoIAlign bilinear sample (C,) of a (C, H, W) numpy map."""
    _, height, width = feat.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feat[:, y0, x0] + (1 - ly) * lx * feat[:, y0, x1]
            + ly * (1 - lx) * feat[:, y1, x0] + ly * lx * feat[:, y1, x1])


def roi_align_loops(feat, box, stride, size):
    """mmcv ``RoIAlign(aligned=True, sampling_ratio=0)`` of one box on a (C, H, W) map, sample by sample."""
    feat = feat.double().numpy()
    x1, y1, x2, y2 = (float(v) / stride - 0.5 for v in box)
    bin_w, bin_h = (x2 - x1) / size, (y2 - y1) / size
    grid_w, grid_h = math.ceil((x2 - x1) / size), math.ceil((y2 - y1) / size)
    out = np.zeros((feat.shape[0], size, size))
    for ph in range(size):
        for pw in range(size):
            acc = np.zeros(feat.shape[0])
            for iy in range(grid_h):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    acc += _bilinear(feat, y, x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w)
            out[:, ph, pw] = acc / max(grid_h * grid_w, 1)
    return torch.from_numpy(out)


def pool(features, rois, size, strides=(4, 8, 16, 32)):
    """Each RoI from its own level, one roi_align call per RoI."""
    out = []
    for roi in rois.tolist():
        level = roi_level(roi[1:], len(strides))
        out.append(roi_align(features[level].double(), torch.tensor([roi], dtype=torch.float64), size,
                             spatial_scale=1 / strides[level], sampling_ratio=0, aligned=True)[0])
    return torch.stack(out) if out else torch.zeros(0, features[0].shape[1], size, size, dtype=torch.float64)


def _conv_unit(unit, x):
    x = F.conv2d(x, unit.conv.weight.double(), None if unit.conv.bias is None else unit.conv.bias.double(), padding=1)
    if unit.bn is not None:
        bn = unit.bn
        x = (x - bn.running_mean.double()[:, None, None]) / torch.sqrt(bn.running_var.double()[:, None, None] + bn.eps)
        x = x * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    return x.clamp(min=0)


def box_head(head, x):
    for unit in head.shared_convs:
        x = _conv_unit(unit, x)
    x = x.reshape(x.shape[0], -1)
    for fc in head.shared_fcs:
        x = (x @ fc.weight.double().T + fc.bias.double()).clamp(min=0)
    return x @ head.fc_cls.weight.double().T + head.fc_cls.bias.double(), x @ head.fc_reg.weight.double().T + head.fc_reg.bias.double()


def mask_probs(head, x, labels):
    for unit in head.convs:
        x = _conv_unit(unit, x)
    x = F.conv_transpose2d(x, head.upsample.weight.double(), head.upsample.bias.double(), stride=2).clamp(min=0)
    x = F.conv2d(x, head.conv_logits.weight.double(), head.conv_logits.bias.double())
    return torch.stack([x[i, int(c)] for i, c in enumerate(labels)]).sigmoid() if len(labels) else x[:, 0]


def decode(box, delta, stds, image_size):
    x1, y1, x2, y2 = box
    dx, dy, dw, dh = (d * s for d, s in zip(delta, stds))
    dw, dh = (min(max(v, -MAX_LOG_RATIO), MAX_LOG_RATIO) for v in (dw, dh))
    w, h = x2 - x1, y2 - y1
    cx, cy = x1 + 0.5 * w + w * dx, y1 + 0.5 * h + h * dy
    w, h = w * math.exp(dw), h * math.exp(dh)
    height, width = image_size
    return [min(max(cx - w / 2, 0), width), min(max(cy - h / 2, 0), height), min(max(cx + w / 2, 0), width), min(max(cy + h / 2, 0), height)]


def iou(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_nms_per_class(cands, iou_threshold):
    """cands: (score, label, box) tuples; kept ones, best first; only boxes of the same class suppress."""
    kept = []
    for cand in sorted(cands, key=lambda c: -c[0]):
        if all(k[1] != cand[1] or iou(k[2], cand[2]) <= iou_threshold for k in kept):
            kept.append(cand)
    return kept


def paste(prob, box, image_size, threshold):
    """mmdet's paste at every pixel of the image: bilinear, zero outside the M x M map."""
    m = prob.shape[-1]
    height, width = image_size
    x0, y0, x1, y1 = box
    u = (torch.arange(width, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * m - 0.5
    v = (torch.arange(height, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * m - 0.5
    padded = F.pad(prob.double(), (1, 1, 1, 1))
    u0, v0 = u.floor(), v.floor()
    fu, fv = (u - u0)[None, :], (v - v0)[:, None]

    def at(vi, ui):
        vi = (vi.long() + 1).clamp(0, m + 1)
        ui = (ui.long() + 1).clamp(0, m + 1)
        return padded[vi[:, None], ui[None, :]]

    value = ((1 - fv) * (1 - fu) * at(v0, u0) + (1 - fv) * fu * at(v0, u0 + 1)
             + fv * (1 - fu) * at(v0 + 1, u0) + fv * fu * at(v0 + 1, u0 + 1))
    return value, value >= threshold


def roi_stage(roi_head, features, proposals, image_sizes, original_sizes):
    """Per image: per stage (rois, logits), and the final {"boxes", "scores", "labels", "probs", "masks"}."""
    bbox_heads, mask_heads = roi_head.bbox_heads, roi_head.mask_heads
    results = []
    for b, (props, size, original) in enumerate(zip(proposals, image_sizes, original_sizes)):
        rois = [[float(b), *p[:4]] for p in props.double().tolist()]
        stages, logits_sum = [], 0
        for k, head in enumerate(bbox_heads):
            logits, deltas = box_head(head, pool(features, torch.tensor(rois, dtype=torch.float64).reshape(-1, 5), 7))
            stages.append((torch.tensor(rois, dtype=torch.float64).reshape(-1, 5), logits))
            logits_sum = logits_sum + logits
            if k + 1 < len(bbox_heads):
                new = []
                for roi, lg, d in zip(rois, logits.tolist(), deltas.tolist()):
                    c = max(range(len(lg) - 1), key=lambda j: lg[j])
                    new.append([roi[0], *decode(roi[1:], d[4 * c: 4 * c + 4], head.bbox_coder.stds, size)])
                rois = new
        scores = (logits_sum / len(bbox_heads)).softmax(-1).tolist()
        sx, sy = size[1] / original[1], size[0] / original[0]
        stds = bbox_heads[-1].bbox_coder.stds
        cands = []
        for roi, sc, d in zip(rois, scores, deltas.tolist()):
            for c in range(len(sc) - 1):
                if sc[c] > roi_head.score_thr:
                    x1, y1, x2, y2 = decode(roi[1:], d[4 * c: 4 * c + 4], stds, size)
                    cands.append((sc[c], c, [x1 / sx, y1 / sy, x2 / sx, y2 / sy]))
        kept = greedy_nms_per_class(cands, roi_head.iou_threshold)[: roi_head.max_per_img]
        res = {"stages": stages, "boxes": torch.tensor([k[2] for k in kept], dtype=torch.float64).reshape(-1, 4),
               "scores": torch.tensor([k[0] for k in kept], dtype=torch.float64), "labels": torch.tensor([k[1] for k in kept])}
        if mask_heads and kept:
            factor = torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
            mask_rois = torch.cat([torch.full((len(kept), 1), float(b), dtype=torch.float64), res["boxes"] * factor], 1)
            feats = pool(features, mask_rois, 14)
            probs = sum(mask_probs(h, feats, res["labels"]) for h in mask_heads) / len(mask_heads)
            pasted = [paste(p, box, original, roi_head.mask_thr_binary) for p, box in zip(probs, res["boxes"].tolist())]
            res["probs"] = torch.stack([p[0] for p in pasted])
            res["masks"] = torch.stack([p[1] for p in pasted])
        results.append(res)
    return results


def _conv1x1_relu(unit, x):
    return F.conv2d(x, unit.conv.weight.double(), unit.conv.bias.double()).clamp(min=0)


def htc_mask_probs(heads, x, labels):
    """HTC's mask stages with information flow, written out: stage k adds ReLU(conv_res(previous last
    conv feature)) to the RoI features; the stages' sigmoids at each RoI's class are averaged."""
    probs, last = 0, None
    for head in heads:
        h = x if last is None else x + _conv1x1_relu(head.conv_res, last)
        for unit in head.convs:
            h = _conv_unit(unit, h)
        last = h
        up = F.conv_transpose2d(h, head.upsample.weight.double(), head.upsample.bias.double(), stride=2).clamp(min=0)
        logits = F.conv2d(up, head.conv_logits.weight.double(), head.conv_logits.bias.double())
        probs = probs + torch.stack([logits[i, int(c)] for i, c in enumerate(labels)]).sigmoid()
    return probs / len(heads)


def semantic_pool(semantic, rois, stride, size, out_size):
    """The semantic map RoIAligned per RoI at ``size`` (one call each), then each (size/out_size)^2 block averaged."""
    out = [roi_align(semantic.double(), torch.tensor([roi], dtype=torch.float64), size, spatial_scale=1 / stride,
                     sampling_ratio=0, aligned=True)[0] for roi in rois.tolist()]
    if not out:
        return torch.zeros(0, semantic.shape[1], out_size, out_size, dtype=torch.float64)
    pooled = torch.stack(out)
    k = size // out_size
    return pooled.reshape(len(out), -1, out_size, k, out_size, k).mean(dim=(3, 5))


def soft_nms_linear_per_class(cands, iou_threshold, min_score):
    """Textbook linear soft-NMS, each class on its own: take the best remaining box, lower every other
    of its class by (1 - IoU) where IoU >= the threshold, drop those under ``min_score``. All kept
    (score at selection, label, box, score before soft-NMS), best first."""
    kept = []
    for label in sorted({c[1] for c in cands}):
        pool_ = [[c[0], c[1], c[2], c[0]] for c in cands if c[1] == label]
        while pool_:
            best = max(range(len(pool_)), key=lambda i: pool_[i][0])
            top = pool_.pop(best)
            kept.append(tuple(top))
            for c in pool_:
                overlap = iou(top[2], c[2])
                if overlap >= iou_threshold:
                    c[0] *= 1 - overlap
            pool_ = [c for c in pool_ if c[0] >= min_score]
    return sorted(kept, key=lambda c: -c[0])


def htc_roi_stage(roi_head, features, semantic, proposals, image_sizes, original_sizes):
    """HTC's RoI stage per image, as ``roi_stage`` with semantic fusion, soft-NMS and mask information flow."""
    bbox_heads, stride, sem_size = roi_head.bbox_heads, roi_head.semantic_stride, roi_head.semantic_roi_size
    soft = {"iou_threshold": 0.3, "min_score": 1e-3, **roi_head.soft_nms}
    results = []
    for b, (props, size, original) in enumerate(zip(proposals, image_sizes, original_sizes)):
        rois = torch.tensor([[float(b), *p[:4]] for p in props.double().tolist()], dtype=torch.float64).reshape(-1, 5)
        stages, logits_sum = [], 0
        for k, head in enumerate(bbox_heads):
            feats = pool(features, rois, 7) + semantic_pool(semantic, rois, stride, sem_size, 7)
            logits, deltas = box_head(head, feats)
            stages.append((rois, logits))
            logits_sum = logits_sum + logits
            if k + 1 < len(bbox_heads):
                rois = torch.tensor([[roi[0], *decode(roi[1:], d[:4], head.bbox_coder.stds, size)]
                                     for roi, d in zip(rois.tolist(), deltas.tolist())], dtype=torch.float64).reshape(-1, 5)
        scores = (logits_sum / len(bbox_heads)).softmax(-1).tolist()
        sx, sy = size[1] / original[1], size[0] / original[0]
        cands = []
        for roi, sc, d in zip(rois.tolist(), scores, deltas.tolist()):
            x1, y1, x2, y2 = decode(roi[1:], d[:4], bbox_heads[-1].bbox_coder.stds, size)
            cands += [(sc[c], c, [x1 / sx, y1 / sy, x2 / sx, y2 / sy]) for c in range(len(sc) - 1) if sc[c] > roi_head.score_thr]
        kept = soft_nms_linear_per_class(cands, soft["iou_threshold"], soft["min_score"])[: roi_head.max_per_img]
        res = {"stages": stages, "boxes": torch.tensor([k[2] for k in kept], dtype=torch.float64).reshape(-1, 4),
               "scores": torch.tensor([k[0] for k in kept], dtype=torch.float64), "labels": torch.tensor([k[1] for k in kept]),
               "decayed": sum(k[0] < k[3] for k in kept)}
        if kept:
            factor = torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
            mask_rois = torch.cat([torch.full((len(kept), 1), float(b), dtype=torch.float64), res["boxes"] * factor], 1)
            feats = pool(features, mask_rois, 14) + semantic_pool(semantic, mask_rois, stride, sem_size, 14)
            probs = htc_mask_probs(roi_head.mask_heads, feats, res["labels"])
            pasted = [paste(p, box, original, roi_head.mask_thr_binary) for p, box in zip(probs, res["boxes"].tolist())]
            res["probs"] = torch.stack([p[0] for p in pasted])
            res["masks"] = torch.stack([p[1] for p in pasted])
        results.append(res)
    return results
