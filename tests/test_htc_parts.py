"""HTC++ parts: soft-NMS (against a slow transcription of mmcv's kernel and the fixture's detections),
upstream's ExtraAttention neck, the fused semantic head and its fusion into RoI features, and the HTC
mask heads with information flow, each against the `htc` fixture made by upstream's own code."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_fixture, max_rel_err
from torchvision.ops import roi_align

from vitadapter.detection.extra_attention import ExtraAttention
from vitadapter.detection.htc_heads import HTCMaskHead, mask_info_flow
from vitadapter.detection.semantic_head import FusedSemanticHead, fuse_semantic
from vitadapter.detection.soft_nms import batched_soft_nms, multiclass_soft_nms, soft_nms

META, CKPT_PATH, IO = load_fixture("htc")
STATE = torch.load(CKPT_PATH.with_name("htc_head.pth"), weights_only=True)["state_dict"]
CFG = META["model"]


def sub_state(prefix):
    return {k[len(prefix):]: v for k, v in STATE.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------
# soft-NMS


def reference_soft_nms(boxes, scores, iou_threshold, sigma, min_score, method, offset):
    """mmcv 1.4.2 softnms_cpu, one scalar at a time in float32: working arrays, the selected box swapped
    to the front, a dropped box overwritten by the current last one. Python's min/max keep their first
    argument on ties and NaN, as std::min/std::max do."""
    f = np.float32
    x1, y1, x2, y2 = ([f(v) for v in col] for col in boxes.T.tolist())
    sc = [f(v) for v in scores.tolist()]
    off = f(offset)
    areas = [(x2[k] - x1[k] + off) * (y2[k] - y1[k] + off) for k in range(len(sc))]
    inds = list(range(len(sc)))
    arrays = [x1, y1, x2, y2, sc, areas, inds]
    n, i, dets = len(sc), 0, []
    while i < n:
        best = i
        for pos in range(i + 1, n):
            if sc[best] < sc[pos]:
                best = pos
        for a in arrays:
            a[i], a[best] = a[best], a[i]
        dets.append([x1[i], y1[i], x2[i], y2[i], sc[i]])
        pos = i + 1
        while pos < n:
            w = max(f(0), min(x2[i], x2[pos]) - max(x1[i], x1[pos]) + off)
            h = max(f(0), min(y2[i], y2[pos]) - max(y1[i], y1[pos]) + off)
            inter = w * h
            with np.errstate(invalid="ignore"):  # zero-area pairs: 0/0, as in mmcv
                iou = inter / (areas[i] + areas[pos] - inter)
            weight = f(1)
            if method == "naive" and iou >= f(iou_threshold):
                weight = f(0)
            elif method == "linear" and iou >= f(iou_threshold):
                weight = f(1) - iou
            elif method == "gaussian":
                weight = np.exp(-(iou * iou) / f(sigma))
            sc[pos] = sc[pos] * weight
            if sc[pos] < f(min_score):
                for a in arrays:
                    a[pos] = a[n - 1]
                n -= 1
            else:
                pos += 1
        i += 1
    return torch.tensor(dets, dtype=torch.float32).reshape(-1, 5), torch.tensor(inds[:n], dtype=torch.long)


def random_boxes(n, generator, clusters=6, size=60.0):
    """Boxes in a few clusters, so that many pairs overlap above any threshold."""
    centres = torch.rand(clusters, 2, generator=generator) * size
    c = centres[torch.randint(clusters, (n,), generator=generator)] + torch.randn(n, 2, generator=generator) * 3
    wh = torch.rand(n, 2, generator=generator) * 20 + 2
    return torch.cat([c - wh / 2, c + wh / 2], dim=1)


def assert_same_as_reference(boxes, scores, exact=True, **kw):
    dets, keep = soft_nms(boxes, scores, **kw)
    ref_dets, ref_keep = reference_soft_nms(boxes, scores, **kw)
    assert torch.equal(keep, ref_keep)
    # bitwise, NaN included (zero-area boxes: IoU 0/0); exp may differ from numpy's in the last bit,
    # and a score decays many times
    torch.testing.assert_close(dets, ref_dets, rtol=0 if exact else 1e-5, atol=0, equal_nan=True)
    return keep


@pytest.mark.parametrize("method", ["linear", "gaussian", "naive"])
@pytest.mark.parametrize("offset", [0, 1])
def test_soft_nms_equals_the_transcribed_kernel_on_random_boxes(method, offset):
    g = torch.Generator().manual_seed(1 + offset)
    dropped = 0
    for n, thr, min_score in [(1, 0.5, 1e-3), (40, 0.3, 1e-3), (150, 0.5, 0.05), (120, 0.7, 0.2)]:
        boxes, scores = random_boxes(n, g), torch.rand(n, generator=g)
        # with and without boxes that start under min_score (mmcv drops those in its first pass)
        for s in (scores, min_score + (1 - min_score) * scores):
            keep = assert_same_as_reference(
                boxes, s, exact=method != "gaussian", iou_threshold=thr, sigma=0.5, min_score=min_score, method=method, offset=offset
            )
            dropped += n - keep.numel()
    assert dropped > 0  # the removal path ran


@pytest.mark.parametrize("method", ["linear", "gaussian", "naive"])
def test_soft_nms_ties_and_identical_boxes_follow_mmcvs_order(method):
    g = torch.Generator().manual_seed(7)
    base = random_boxes(30, g)
    cases = [
        (base[torch.randint(30, (90,), generator=g)], torch.randint(1, 4, (90,), generator=g).float() / 4),  # repeats, 3 score levels
        (base.repeat(3, 1), torch.full((90,), 0.5)),  # every score equal, every box three times
        (base[:1].repeat(12, 1), torch.rand(12, generator=g)),  # one box twelve times
        (torch.zeros(5, 4), torch.full((5,), 0.9)),  # empty boxes: IoU 0/0
        # IoU exactly 0.5 with the first box: the threshold itself decays
        (torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [0, 5, 10, 10], [0, 0, 5, 10]]), torch.tensor([0.9, 0.8, 0.8, 0.7])),
    ]
    for boxes, scores in cases:
        for min_score in (1e-3, 0.3):
            assert_same_as_reference(
                boxes, scores, exact=method != "gaussian", iou_threshold=0.5, sigma=0.5, min_score=min_score, method=method, offset=0
            )


def test_soft_nms_edge_inputs_and_errors():
    dets, keep = soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert dets.shape == (0, 5) and keep.shape == (0,) and keep.dtype == torch.long
    boxes = torch.tensor([[0.0, 0, 10, 10]])
    with pytest.raises(ValueError, match="boxes"):
        soft_nms(torch.zeros(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="scores"):
        soft_nms(boxes, torch.zeros(2))
    with pytest.raises(ValueError, match="scores"):
        soft_nms(boxes, torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="dtype"):
        soft_nms(boxes, torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="method"):
        soft_nms(boxes, torch.ones(1), method="hard")
    with pytest.raises(ValueError, match="offset"):
        soft_nms(boxes, torch.ones(1), offset=2)
    with pytest.raises(ValueError, match="idxs"):
        batched_soft_nms(boxes, torch.ones(1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="multi_bboxes"):
        multiclass_soft_nms(torch.zeros(3, 8), torch.rand(3, 5), 0.01)


def shifted(boxes, labels):
    """mmcv batched_nms's class offsets, written out: label * (max coordinate + 1), in float32."""
    return boxes + (labels.float() * (boxes.max() + torch.tensor(1.0)))[:, None]


def batched_case(case, n=200, classes=5, seed=3, clusters=6):
    """Boxes, scores and labels for one kind of input."""
    g = torch.Generator().manual_seed(seed)
    boxes, labels = random_boxes(n, g, clusters).clamp(min=0), torch.randint(0, classes, (n,), generator=g)
    scores = torch.rand(n, generator=g)
    if case == "ties_across_classes":  # the same score in several classes, none twice in one class
        scores = torch.rand(n // classes + 1, generator=g)[torch.argsort(torch.argsort(labels, stable=True)) % (n // classes + 1)]
        scores = torch.where(torch.bincount(labels, minlength=classes)[labels] <= n // classes + 1, scores, torch.rand(n, generator=g))
        assert len(set(zip(labels.tolist(), scores.tolist()))) == n
    elif case == "ties_within_classes":
        scores[::7] = 0.5
    elif case == "classes_overlap":  # negative coordinates: mmcv's offsets no longer part the classes
        boxes = boxes - 30
    # mmcv drops boxes that start under min_score in its first pass, whichever class
    return boxes, scores if case == "below_min_score" else 0.5 + 0.5 * scores, labels


def count_calls(monkeypatch, *names):
    import vitadapter.detection.soft_nms as module

    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize(
    "case, path",
    [
        ("distinct", "lockstep"),
        ("ties_across_classes", "_order_ties"),
        ("ties_within_classes", "_soft_nms_in_order"),
        ("classes_overlap", "lockstep"),  # one group of all boxes
        ("below_min_score", "_soft_nms_in_order"),
    ],
)
@pytest.mark.parametrize("seed", [3, 4])
def test_batched_soft_nms_matches_the_reference(case, path, seed, monkeypatch):
    boxes, scores, labels = batched_case(case, n=300, classes=3, seed=seed, clusters=3)
    calls = count_calls(monkeypatch, "_order_ties", "_soft_nms_in_order")
    kw = dict(iou_threshold=0.4, sigma=0.5, min_score=0.3, method="linear", offset=0)
    dets, keep = batched_soft_nms(boxes, scores, labels, **kw)
    assert keep.numel() < 0.6 * scores.numel()  # many drops: the working order is reshuffled often
    assert calls == {"_order_ties": int(path == "_order_ties"), "_soft_nms_in_order": int(path == "_soft_nms_in_order")}
    ref_dets, ref_keep = reference_soft_nms(shifted(boxes, labels), scores, **kw)
    assert torch.equal(keep, ref_keep)
    assert torch.equal(dets[:, :4], boxes[keep])
    assert torch.equal(dets[:, 4], ref_dets[:, 4])


@pytest.mark.parametrize("case", ["distinct", "ties_within_classes", "below_min_score"])
def test_batched_soft_nms_split_branch_matches_the_reference(case, monkeypatch):
    boxes, scores, labels = batched_case(case)
    kw = dict(iou_threshold=0.4, sigma=0.5, min_score=0.02, method="linear", offset=0)
    calls = count_calls(monkeypatch, "soft_nms")
    dets, keep = batched_soft_nms(boxes, scores, labels, split_thr=50, **kw)
    # the classes run side by side unless a working order matters; then one by one
    assert calls["soft_nms"] == (0 if case == "distinct" else 5)
    moved = shifted(boxes, labels)
    kept, kept_scores = [], []
    for c in range(5):
        members = (labels == c).nonzero().view(-1)
        d, k = reference_soft_nms(moved[members], scores[members], **kw)
        kept += members[k].tolist()
        kept_scores += d[:, 4].tolist()
    # mmcv gathers the survivors in index order, then sorts by score (ties: index order here)
    pairs = sorted(zip(kept, kept_scores), key=lambda p: (-p[1], p[0]))
    assert torch.equal(keep, torch.tensor([p[0] for p in pairs]))
    assert torch.equal(dets[:, 4], torch.tensor([p[1] for p in pairs]))
    assert torch.equal(dets[:, :4], boxes[keep])


def test_batched_soft_nms_groups_do_not_interact():
    """Independent of the offset trick: per group, batched soft-NMS keeps what soft-NMS of that group
    alone keeps (scores to float32 rounding of the shifted coordinates)."""
    g = torch.Generator().manual_seed(5)
    n = 120
    boxes, scores, labels = random_boxes(n, g), torch.rand(n, generator=g), torch.randint(0, 4, (n,), generator=g)
    dets, keep = batched_soft_nms(boxes, scores, labels, iou_threshold=0.5, min_score=0.05)
    assert keep.numel() < n
    for c in range(4):
        members = (labels == c).nonzero().view(-1)
        d, k = soft_nms(boxes[members], scores[members], iou_threshold=0.5, min_score=0.05)
        mine = labels[keep] == c
        assert torch.equal(keep[mine], members[k])
        torch.testing.assert_close(dets[mine], d, rtol=1e-5, atol=1e-6)


def test_batched_soft_nms_class_agnostic_is_one_plain_call():
    boxes, scores, labels = batched_case("ties_within_classes")
    dets, keep = batched_soft_nms(boxes, scores, labels, iou_threshold=0.4, min_score=0.3, class_agnostic=True)
    ref_dets, ref_keep = reference_soft_nms(boxes, scores, iou_threshold=0.4, sigma=0.5, min_score=0.3, method="linear", offset=0)
    assert torch.equal(keep, ref_keep) and torch.equal(dets, ref_dets)


def test_multiclass_soft_nms_reproduces_the_fixture_detections():
    rcnn = META["test_cfg"]["rcnn"]
    assert rcnn["nms"] == {"type": "soft_nms", "iou_threshold": 0.5}
    probs = F.softmax(IO["cls_score_mean_i0"], dim=-1)
    dets, labels = multiclass_soft_nms(
        IO["bboxes_pre_nms_i0"], probs, rcnn["score_thr"], rcnn["max_per_img"], iou_threshold=rcnn["nms"]["iou_threshold"]
    )
    assert torch.equal(labels, IO["det_labels_i0"])
    assert max_rel_err(dets[:, :4], IO["det_bboxes_i0"][:, :4]) < 1e-6
    torch.testing.assert_close(dets[:, 4], IO["det_bboxes_i0"][:, 4], rtol=1e-6, atol=0)
    # the counts upstream's run logged: 341 candidates, 242 survive the single soft-NMS call
    stats = META["counts"]["soft_nms_calls_in_call_order"][0]
    all_dets, _ = multiclass_soft_nms(IO["bboxes_pre_nms_i0"], probs, rcnn["score_thr"], iou_threshold=0.5)
    assert ((probs[:, :-1] > rcnn["score_thr"]).sum().item(), all_dets.shape[0]) == (stats["boxes_in"], stats["kept"])


def test_multiclass_soft_nms_per_class_boxes_and_nothing_above_threshold():
    g = torch.Generator().manual_seed(11)
    n, k = 30, 3
    per_class = torch.cat([random_boxes(n, g) for _ in range(k)], dim=1)
    probs = torch.softmax(torch.randn(n, k + 1, generator=g) * 3, dim=-1)
    dets, labels = multiclass_soft_nms(per_class, probs, 0.05, max_num=20, iou_threshold=0.5)
    assert dets.shape[0] == labels.shape[0] <= 20
    rows = [(dets[:, :4][i] == per_class.view(n, k, 4)[:, labels[i]]).all(1).nonzero() for i in range(len(labels))]
    assert all(r.numel() >= 1 for r in rows)  # each detection is its class's own box
    empty, empty_labels = multiclass_soft_nms(per_class, probs, 1.0)
    assert empty.shape == (0, 5) and empty_labels.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_soft_nms_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(2)
    boxes, scores, labels = random_boxes(300, g), torch.rand(300, generator=g), torch.randint(0, 10, (300,), generator=g)
    scores[::5] = 0.25
    cpu = batched_soft_nms(boxes, scores, labels, iou_threshold=0.5, min_score=0.01)
    gpu = batched_soft_nms(boxes.cuda(), scores.cuda(), labels.cuda(), iou_threshold=0.5, min_score=0.01)
    assert torch.equal(cpu[1], gpu[1].cpu())
    assert torch.equal(cpu[0], gpu[0].cpu())


# ---------------------------------------------------------------------------------------------------
# ExtraAttention


def neck_cfg():
    cfg = dict(CFG["neck"][0])
    assert cfg.pop("type") == "ExtraAttention"
    return cfg


def test_extra_attention_reproduces_the_fixture():
    neck = ExtraAttention(**neck_cfg()).eval()
    neck.load_state_dict(sub_state("neck.0."), strict=True)
    levels = [IO[f"out{i}"] for i in range(4)]
    with torch.no_grad():
        out = neck(levels)
    assert all(out[i] is levels[i] for i in range(3))
    assert max_rel_err(out[3], IO["extra_attn_out3"]) < 1e-4


def reference_extra_attention(p, x, heads, eps=1e-5):
    """The block written out in float64: explicit softmax attention, exact GELU."""
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)

    def ln(v, name):
        return F.layer_norm(v, (c,), p[f"{name}.weight"], p[f"{name}.bias"], eps)

    q, k, v = (ln(t, "norm1") @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).split(c, dim=-1)
    q, k, v = (z.reshape(b, -1, heads, c // heads).transpose(1, 2) for z in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    attn = (a @ v).transpose(1, 2).reshape(b, -1, c) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
    t = t + p.get("gamma_1", 1) * attn
    if "ffn.fc1.weight" in p:
        hidden = F.gelu(ln(t, "norm2") @ p["ffn.fc1.weight"].T + p["ffn.fc1.bias"])
        t = t + p.get("gamma_2", 1) * (hidden @ p["ffn.fc2.weight"].T + p["ffn.fc2.bias"])
    if "final_norm.weight" in p:
        t = ln(t, "final_norm")
    return t.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(init_values=0.3), dict(with_ffn=False, use_final_norm=False, init_values=1e-2), dict(ffn_ratio=2.0, num_head=2)],
)
def test_extra_attention_variants_equal_the_reference(kw):
    kw = {"num_head": 4, **kw}
    neck = ExtraAttention([8, 16, 16], **kw).double().eval()
    with torch.no_grad():
        for prm in neck.parameters():
            prm.add_(torch.randn_like(prm) * 0.3)
    levels = [torch.randn(2, c, s, s + 1, dtype=torch.float64) for c, s in [(8, 12), (16, 6), (16, 3)]]
    with torch.no_grad():
        out = neck(levels)
    ref = reference_extra_attention(dict(neck.state_dict()), levels[-1], kw["num_head"])
    torch.testing.assert_close(out[-1], ref, rtol=1e-10, atol=1e-10)
    assert ("gamma_2" in neck.state_dict()) == ("init_values" in kw)


def test_extra_attention_checkpointing_gives_the_same_gradients():
    neck = ExtraAttention([16, 16], num_head=2, drop_path=0.0)
    levels = [torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 5, requires_grad=True)]
    neck(levels)[-1].square().sum().backward()
    plain = [prm.grad.clone() for prm in neck.parameters()] + [levels[1].grad.clone()]
    neck.zero_grad()
    levels[1].grad = None
    neck.set_grad_checkpointing(True)
    neck(levels)[-1].square().sum().backward()
    again = [prm.grad for prm in neck.parameters()] + [levels[1].grad]
    assert all(a is not None and torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, again))


def test_extra_attention_rejects_bad_input():
    with pytest.raises(ValueError, match="in_channels"):
        ExtraAttention(96, num_head=6)
    with pytest.raises(ValueError, match="num_head"):
        ExtraAttention([96], num_head=5)
    neck = ExtraAttention([8, 16], num_head=2)
    with pytest.raises(ValueError, match="levels"):
        neck([torch.randn(1, 16, 4, 4)])
    with pytest.raises(ValueError, match="last pyramid level"):
        neck([torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)])


# ---------------------------------------------------------------------------------------------------
# semantic head and fusion; the RoI features it is fused into, computed here with mmdet's rules


def semantic_head():
    cfg = dict(CFG["roi_head"]["semantic_head"])
    assert cfg.pop("type") == "FusedSemanticHead"
    cfg.pop("loss_seg")
    head = FusedSemanticHead(**cfg).eval()
    head.load_state_dict(sub_state("roi_head.semantic_head."), strict=True)
    return head


def test_fused_semantic_head_reproduces_the_fixture():
    with torch.no_grad():
        logits, feat = semantic_head()([IO[f"fpn{i}"] for i in range(5)])
    assert max_rel_err(logits, IO["semantic_logits"]) < 1e-4
    assert max_rel_err(feat, IO["semantic_feat"]) < 1e-4


def test_fused_semantic_head_rejects_bad_input():
    with pytest.raises(ValueError, match="fusion_level"):
        FusedSemanticHead(num_ins=2, fusion_level=2)
    head = FusedSemanticHead(num_ins=2, fusion_level=0, num_convs=1, in_channels=8, conv_out_channels=8, num_classes=3)
    with pytest.raises(ValueError, match="levels"):
        head([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="level 1"):
        head([torch.randn(1, 8, 4, 4), torch.randn(1, 4, 2, 2)])
    with pytest.raises(ValueError, match="rois"):
        fuse_semantic(torch.randn(2, 8, 7, 7), torch.randn(1, 8, 10, 10), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="roi_feats"):
        fuse_semantic(torch.randn(3, 8, 7, 7), torch.randn(1, 8, 10, 10), torch.zeros(2, 5))


def multilevel_roi_features(rois, size):
    """mmdet's SingleRoIExtractor over fpn0..fpn3: level floor(log2(sqrt(area) / 56 + 1e-6)) clamped to
    0..3, aligned RoIAlign with adaptive sampling."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()
    out = rois.new_zeros(rois.shape[0], IO["fpn0"].shape[1], size, size)
    for lvl in range(4):
        idx = (levels == lvl).nonzero().view(-1)
        if idx.numel():
            out[idx] = roi_align(IO[f"fpn{lvl}"], rois[idx], size, spatial_scale=1 / 2 ** (lvl + 2), sampling_ratio=0, aligned=True)
    return out


def shared4conv1fc(p, x):
    """mmdet's Shared4Conv1FCBBoxHead, written out: 4 x (conv3x3 + ReLU), flatten, fc + ReLU, cls / reg."""
    for j in range(4):
        x = F.relu(F.conv2d(x, p[f"shared_convs.{j}.conv.weight"], p[f"shared_convs.{j}.conv.bias"], padding=1))
    x = F.relu(F.linear(x.flatten(1), p["shared_fcs.0.weight"], p["shared_fcs.0.bias"]))
    return F.linear(x, p["fc_cls.weight"], p["fc_cls.bias"]), F.linear(x, p["fc_reg.weight"], p["fc_reg.bias"])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_semantic_fusion_into_box_features_reproduces_each_stage(stage):
    rois = IO[f"s{stage}_rois_i0"]
    with torch.no_grad():
        fused = fuse_semantic(multilevel_roi_features(rois, 7), IO["semantic_feat"], rois)
        cls_score, bbox_pred = shared4conv1fc(sub_state(f"roi_head.bbox_head.{stage}."), fused)
    assert max_rel_err(cls_score, IO[f"s{stage}_cls_score_i0"]) < 1e-4
    assert max_rel_err(bbox_pred, IO[f"s{stage}_bbox_pred_i0"]) < 1e-4
    # without the semantic term the same head is far off: the test sees the fusion
    unfused, _ = shared4conv1fc(sub_state(f"roi_head.bbox_head.{stage}."), multilevel_roi_features(rois, 7))
    assert max_rel_err(unfused, IO[f"s{stage}_cls_score_i0"]) > 1e-2


def test_fuse_semantic_box_branch_is_the_2x2_mean_of_the_14x14_pooling():
    g = torch.Generator().manual_seed(4)
    sem = torch.randn(2, 6, 40, 50, generator=g)
    boxes = random_boxes(9, g, size=300.0).clamp(0, 390)
    rois = torch.cat([torch.randint(0, 2, (9, 1), generator=g).float(), boxes], dim=1)
    base = torch.randn(9, 6, 7, 7, generator=g)
    pooled14 = roi_align(sem, rois, 14, spatial_scale=1 / 8, sampling_ratio=0, aligned=True)
    expected = base + pooled14.reshape(9, 6, 7, 2, 7, 2).mean(dim=(3, 5))
    torch.testing.assert_close(fuse_semantic(base, sem, rois), expected)
    base14 = torch.randn(9, 6, 14, 14, generator=g)
    torch.testing.assert_close(fuse_semantic(base14, sem, rois), base14 + pooled14)


# ---------------------------------------------------------------------------------------------------
# HTC mask heads with information flow


def mask_heads():
    heads = []
    for k, cfg in enumerate(CFG["roi_head"]["mask_head"]):
        cfg = dict(cfg)
        assert cfg.pop("type") == "HTCMaskHead"
        cfg.pop("loss_mask")
        head = HTCMaskHead(**cfg).eval()
        head.load_state_dict(sub_state(f"roi_head.mask_head.{k}."), strict=True)
        heads.append(head)
    return heads


def test_mask_info_flow_reproduces_each_stage_and_the_mean():
    scale = torch.tensor(META["img_metas"][0]["scale_factor"], dtype=torch.float32)
    det = IO["det_bboxes_i0"]
    rois = torch.cat([det.new_zeros(det.shape[0], 1), det[:, :4] * scale], dim=1)
    labels = IO["det_labels_i0"]
    with torch.no_grad():
        feats = fuse_semantic(multilevel_roi_features(rois, 14), IO["semantic_feat"], rois)
        logits = mask_info_flow(mask_heads(), feats)
    rows = torch.arange(det.shape[0])
    for k, stage_logits in enumerate(logits):
        assert stage_logits.shape == (det.shape[0], 80, 28, 28)
        assert max_rel_err(stage_logits[rows, labels], IO[f"mask_logits_s{k}_i0"]) < 1e-4
    mean = torch.stack([s[rows, labels].sigmoid() for s in logits]).mean(0)
    assert (mean - IO["mask_prob_mean_i0"]).abs().max() < 1e-5


def test_htc_mask_head_parts_and_errors():
    head = HTCMaskHead(num_convs=2, in_channels=8, conv_out_channels=8, num_classes=3)
    x, res = torch.randn(4, 8, 14, 14), torch.randn(4, 8, 14, 14)
    logits, feat = head(x, res)
    assert logits.shape == (4, 3, 28, 28) and feat.shape == (4, 8, 14, 14)
    torch.testing.assert_close(head.features(x, res), feat)
    torch.testing.assert_close(head.logits(feat), logits)
    # the flow term: ReLU(conv_res(res)) added to the input before the convs
    shifted_input = x + F.relu(F.conv2d(res, head.conv_res.conv.weight, head.conv_res.conv.bias))
    torch.testing.assert_close(head.features(shifted_input), feat)
    assert HTCMaskHead(in_channels=8, conv_out_channels=8, class_agnostic=True)(torch.randn(1, 8, 14, 14))[0].shape[1] == 1
    first = HTCMaskHead(num_convs=1, in_channels=8, conv_out_channels=8, num_classes=3, with_conv_res=False)
    assert not any("conv_res" in k for k in first.state_dict())
    with pytest.raises(ValueError, match="conv_res"):
        first(x, res)
    with pytest.raises(ValueError, match="RoI features"):
        head(torch.randn(4, 5, 14, 14))
