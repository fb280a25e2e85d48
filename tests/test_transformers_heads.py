"""transformers' UperNet and Mask2Former on a vitadapter backbone, one training step each."""
import subprocess
import sys

import pytest
import torch

import vitadapter  # noqa: F401  (registers the models with timm)

transformers = pytest.importorskip("transformers")
from vitadapter.integrations.transformers import backbone_config  # noqa: E402


def grads_of(module):
    return {n: p.grad for n, p in module.named_parameters()}


def test_upernet_trains_on_the_four_levels():
    config = transformers.UperNetConfig(
        backbone_config=backbone_config("vit_adapter_t"), hidden_size=32, auxiliary_in_channels=192,
        auxiliary_channels=16, num_labels=5,
    )
    model = transformers.UperNetForSemanticSegmentation(config).train()
    image, labels = torch.randn(2, 3, 64, 96), torch.randint(0, 5, (2, 64, 96))
    out = model(pixel_values=image, labels=labels)
    assert out.logits.shape == (2, 5, 64, 96) and torch.isfinite(out.loss)
    out.loss.backward()
    grads = grads_of(model.backbone)
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_mask2former_trains_on_the_four_levels():
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone_config("vit_adapter_t"), feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_queries=8,
        num_labels=4, num_attention_heads=4, train_num_points=64,
    )
    model = transformers.Mask2FormerForUniversalSegmentation(config).train()
    masks = torch.zeros(2, 64, 96)
    masks[0, :32], masks[1, 32:] = 1, 1
    out = model(pixel_values=torch.randn(2, 3, 64, 96), mask_labels=[masks, masks.flip(0)],
                class_labels=[torch.tensor([0, 2]), torch.tensor([1, 3])])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = grads_of(model.model.pixel_level_module.encoder)
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_timm_backbone_with_fewer_levels_uses_every_parameter():
    backbone = transformers.TimmBackbone(backbone_config("vit_adapter_t", out_indices=(1, 3))).train()
    maps = backbone(torch.randn(2, 3, 64, 64)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 192, 8, 8), (2, 192, 2, 2)]
    sum(m.mean() for m in maps).backward()
    grads = grads_of(backbone)
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_backbone_config_refuses_a_fifth_level():
    with pytest.raises(ValueError, match=r"levels 0-3.*\(1, 2, 3, 4\)"):
        backbone_config("vit_adapter_t", out_indices=(1, 2, 3, 4))


def test_transformers_finds_the_models_when_it_is_what_imports_timm():
    """transformers looks timm up before importing it; the models must still register."""
    code = (
        "import vitadapter, transformers\n"
        "from transformers import TimmBackbone, TimmBackboneConfig\n"
        "TimmBackbone(TimmBackboneConfig(backbone='vit_adapter_t', out_indices=(0, 1, 2, 3), use_pretrained_backbone=False))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
