"""Consumers that take a timm model name: segmentation_models_pytorch and transformers."""
import pytest
import torch

import vitadapter  # noqa: F401  (registers the models with timm)


def test_segmentation_models_pytorch_by_name():
    smp = pytest.importorskip("segmentation_models_pytorch")
    image = torch.randn(1, 3, 64, 96)
    for decoder in (smp.Unet, smp.FPN, smp.UPerNet):
        model = decoder("tu-vit_adapter_t", encoder_weights=None, classes=5).eval()
        with torch.no_grad():
            assert model(image).shape == (1, 5, 64, 96)


def test_transformers_timm_backbone_by_name():
    transformers = pytest.importorskip("transformers")
    config = transformers.TimmBackboneConfig(
        backbone="vit_adapter_t", use_pretrained_backbone=False, out_indices=(0, 1, 2, 3)
    )
    backbone = transformers.TimmBackbone(config).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 96)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(1, 192, 16, 24), (1, 192, 8, 12), (1, 192, 4, 6), (1, 192, 2, 3)]
    assert list(backbone.channels) == [192] * 4
