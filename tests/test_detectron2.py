"""vitadapter as a detectron2 backbone (skipped without detectron2, which is not on PyPI; see
docs/integrations.md for how it was run against detectron2's source)."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")
from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import get_cfg, instantiate  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from vitadapter.integrations.detectron2 import ViTAdapterBackbone, add_vit_adapter_config  # noqa: E402

TINY = dict(embed_dim=24, depth=4, num_heads=3, deform_num_heads=3, conv_inplane=8)


def test_registered_fpn_builder_gives_p2_to_p6():
    cfg = get_cfg()
    add_vit_adapter_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_vit_adapter_fpn_backbone"
    cfg.MODEL.VIT_ADAPTER.NAME = "vit_adapter_t"
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    backbone = build_backbone(cfg).eval()
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "p2": (32, 4), "p3": (32, 8), "p4": (32, 16), "p5": (32, 32), "p6": (32, 64),
    }
    assert backbone.bottom_up.size_divisibility == 0
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in maps.items()} == {
        "p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2),
    }


def test_bottom_up_alone_takes_any_size_and_prunes_unused_levels():
    backbone = ViTAdapterBackbone("vit_adapter_t", out_features=["res4", "res5"], **TINY)
    maps = backbone(torch.randn(2, 3, 70, 50))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"res4": (2, 24, 5, 4), "res5": (2, 24, 3, 2)}
    sum(m.mean() for m in maps.values()).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def mask_rcnn_fpn_config():
    """detectron2's own LazyConfig of Mask R-CNN FPN, from an installed package or a source checkout."""
    import detectron2
    from detectron2.config import LazyConfig

    package = Path(detectron2.__file__).parent
    for root in (package / "model_zoo" / "configs", package.parent / "configs"):
        if (root / "common" / "models" / "mask_rcnn_fpn.py").is_file():
            return LazyConfig.load(str(root / "common" / "models" / "mask_rcnn_fpn.py"))
    pytest.skip("detectron2's model-zoo configs are not installed")


def test_lazyconfig_mask_rcnn_takes_a_training_step():
    cfg = mask_rcnn_fpn_config()
    cfg.model.backbone.bottom_up = L(ViTAdapterBackbone)(name="vit_adapter_t", out_features=["res2", "res3", "res4", "res5"], **TINY)
    cfg.model.roi_heads.num_classes = 3
    cfg.model.roi_heads.batch_size_per_image = 64
    cfg.model.pixel_mean, cfg.model.pixel_std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    model = instantiate(cfg.model).train()
    batch = []
    for h, w in ((96, 130), (110, 80)):
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 5.0, w / 2, h / 2], [w / 3, h / 4, w - 2.0, h - 3.0]]))
        instances.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        masks[0, 5 : h // 2, 4 : w // 2] = True
        masks[1, h // 4 : h - 3, w // 3 : w - 2] = True
        instances.gt_masks = BitMasks(masks)
        batch.append(dict(image=torch.rand(3, h, w) * 255, instances=instances))
    bottom_up = model.backbone.bottom_up
    before = {n: p.detach().clone() for n, p in bottom_up.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        with EventStorage():  # detectron2's trainer provides one: the heads log into it
            losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total) and "loss_mask" in losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in bottom_up.named_parameters() if n.startswith("model.vit"))
