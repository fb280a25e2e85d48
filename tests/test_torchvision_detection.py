"""vitadapter as the backbone of torchvision's detectors, and torch.fx tracing of the model."""
import pytest
import torch

import vitadapter

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names  # noqa: E402

from vitadapter.integrations.torchvision import vit_adapter_fpn  # noqa: E402

TINY = dict(embed_dim=24, depth=4, num_heads=3, deform_num_heads=3, conv_inplane=8)
# small images: the detector's transform resizes every image so its short side is min_size
SMALL = dict(min_size=96, max_size=160)
# fewer proposals and sampled boxes in training: torchvision's defaults (2000 proposals, 512 boxes
# per image through a 1024-wide box head and the 256-channel mask head) took 2 s a step, the tiny
# backbone 0.1 s of it; every head and loss still trains
FEW_BOXES = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_batch_size_per_image=64,
                 box_batch_size_per_image=64)


def synthetic_targets(images):
    """Two boxes per image with a filled mask inside each."""
    targets = []
    for image in images:
        h, w = image.shape[-2:]
        boxes = torch.tensor([[4.0, 6.0, w * 0.5, h * 0.6], [w * 0.3, h * 0.2, w - 3.0, h - 5.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks))
    return targets


def test_mask_rcnn_trains_on_odd_sizes_with_the_fpn_backbone():
    backbone = vit_adapter_fpn("vit_adapter_t", out_channels=32, **TINY)
    assert backbone.out_channels == 32
    model = MaskRCNN(backbone, num_classes=3, **SMALL, **FEW_BOXES).train()
    images = [torch.rand(3, 101, 157), torch.rand(3, 133, 90)]
    targets = synthetic_targets(images)
    before = {n: p.detach().clone() for n, p in backbone.body.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        losses = model(images, targets)
        assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    changed = [n for n, p in backbone.body.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("vit.blocks") for n in changed) and any(n.startswith("interactions") for n in changed)
    assert any(n.startswith("norm1") for n in changed) and any(n.startswith("spm") for n in changed)


@pytest.mark.parametrize("detector", [FasterRCNN, RetinaNet])
def test_faster_rcnn_and_retinanet_take_the_backbone(detector):
    model = detector(vit_adapter_fpn("vit_adapter_t", out_channels=32, **TINY), num_classes=3, **SMALL).eval()
    with torch.no_grad():
        detections = model([torch.rand(3, 99, 120)])
    assert set(detections[0]) == {"boxes", "scores", "labels"}


def test_fpn_levels_are_p2_to_p5_and_pool():
    backbone = vit_adapter_fpn("vit_adapter_t", out_channels=16, **TINY).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 70, 100))
    assert [(k, tuple(v.shape)) for k, v in maps.items()] == [
        ("0", (1, 16, 18, 25)), ("1", (1, 16, 9, 13)), ("2", (1, 16, 5, 7)), ("3", (1, 16, 3, 4)), ("pool", (1, 16, 2, 2)),
    ]


def test_torch_fx_traces_the_model_and_create_feature_extractor_equals_eager():
    model = vitadapter.create_model("vit_adapter_t", **TINY).eval()
    nodes = get_graph_node_names(model)[1]
    assert {"norm1", "norm2", "norm3", "norm4"} <= set(nodes)
    image = torch.randn(2, 3, 70, 50)
    with torch.no_grad():
        reference = model(image)
        traced = torch.fx.symbolic_trace(model)(image)
        extractor = create_feature_extractor(model, return_nodes={nodes[-1]: "stride32"})
        last = extractor(image)["stride32"]
    assert all(torch.equal(a, b) for a, b in zip(traced, reference))
    assert torch.equal(last, reference[3])
    backbone = vit_adapter_fpn("vit_adapter_t", out_channels=16, **TINY).eval()
    with torch.no_grad():
        fpn = create_feature_extractor(backbone, return_nodes={"fpn": "fpn"})(image)["fpn"]
        assert all(torch.equal(a, b) for a, b in zip(fpn.values(), backbone(image).values()))


def test_traced_model_keeps_the_clear_input_errors():
    traced = torch.fx.symbolic_trace(vitadapter.create_model("vit_adapter_t", **TINY))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        traced(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="at least 32x32"):
        traced(torch.randn(1, 3, 16, 64))
