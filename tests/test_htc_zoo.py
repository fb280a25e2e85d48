"""The registered HTC++ detectors against upstream's own configs (tests/fixtures/htc_zoo_configs.json:
upstream's htc++ config files evaluated as Python), and the GroupNorm FPN of its Objects365 release."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import vitadapter
from conftest import FIXTURES
from vitadapter._meta import meta_device
from vitadapter.converters.mmdet import detector_heads_kwargs
from vitadapter.detection import TwoStageDetectorHeads
from vitadapter.detection.fpn import FPN
from vitadapter.predict import padded_detection_size

CONFIGS = json.loads((FIXTURES / "htc_zoo_configs.json").read_text())["configs"]
ZOO = {
    "htc_augreg_adapter_l.coco": "htc++_augreg_adapter_large_fpn_3x_coco",
    "htc_beit_adapter_l.coco": "htc++_beit_adapter_large_fpn_3x_coco",
    "htc_beitv2_adapter_l.coco": "htc++_beitv2_adapter_large_fpn_3x_coco",
    "htc_beitv2_adapter_l_gn.o365_coco": "htc++_beitv2_adapter_large_fpn_o365_coco",
}


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_registered_htc_detector_is_upstreams_config(name):
    """Heads, backbone, test settings, test scale and normalisation of each registered HTC++ detector are
    those upstream's config builds (meta device: full size, no memory)."""
    upstream = CONFIGS[ZOO[name]]["single_scale"]
    model_cfg = copy.deepcopy(upstream["model"])
    with meta_device():
        model = vitadapter.create_model(name)
        heads = TwoStageDetectorHeads(**detector_heads_kwargs(model_cfg))
        backbone = vitadapter.load_upstream(model_cfg["backbone"], "detection")
    assert shapes(model.backbone) == shapes(backbone)
    assert model.backbone.model_args.get("window_size") == backbone.model_args.get("window_size")
    ours = {k: v for k, v in shapes(model).items() if not k.startswith("backbone.")}
    assert ours == shapes(heads)
    for part in ("score_thr", "soft_nms", "max_per_img", "mask_thr_binary"):
        assert getattr(model.roi_head, part) == getattr(heads.roi_head, part), part
    assert model.roi_head.semantic_head.conv_logits.out_channels == 183
    assert model.neck[0].drop_path.drop_prob == model_cfg["neck"][0]["drop_path"]
    assert model.neck[0].attn.num_heads == model_cfg["neck"][0]["num_head"] == 32
    gn = model_cfg["neck"][1].get("norm_cfg")
    assert (model.neck[1].fpn_convs[0].gn is not None) == (gn is not None) and model.neck[1].fpn_convs[0].bn is None
    assert model.test_scale == tuple(upstream["img_scale"])
    norm = upstream["img_norm_cfg"]
    assert model.mean == pytest.approx([m / 255 for m in norm["mean"]]) and model.std == pytest.approx([s / 255 for s in norm["std"]])
    # the catalog's input: the padded batch the largest image under this test scale becomes
    size = vitadapter.models.htc.default_cfgs[name.split(".")[0]].cfgs[name.split(".")[1]].input_size
    assert size[1:] == padded_detection_size(*reversed(upstream["img_scale"]), model.test_scale)


def test_backbone_tags_point_at_the_same_release_files():
    """Each HTC++ release also gives its backbone tag (heads dropped on load)."""
    import timm

    for name, backbone in (("htc_augreg_adapter_l.coco", "vit_adapter_l_det.augreg_htc_coco"),
                           ("htc_beitv2_adapter_l_gn.o365_coco", "beitv2_adapter_l_det.htc_o365_coco")):
        assert timm.models.get_pretrained_cfg(name).url == timm.models.get_pretrained_cfg(backbone).url


def test_group_norm_fpn_against_a_functional_version():
    """FPN(norm="GN"): every conv (no bias) then GroupNorm, top-down nearest upsampling, max-pooled extra
    level, recomputed with torch.nn.functional from the module's own parameters."""
    torch.manual_seed(0)
    fpn = FPN([6, 10, 12, 14], 16, num_outs=5, norm="GN", num_groups=4).eval()
    with torch.no_grad():
        for p in fpn.parameters():
            p.normal_()
    feats = [torch.randn(2, c, 40 // 2**i + 1, 36 // 2**i) for i, c in enumerate([6, 10, 12, 14])]
    state = fpn.state_dict()
    assert not any(k.endswith("conv.bias") for k in state) and "lateral_convs.0.gn.weight" in state

    def unit(x, prefix, pad):
        x = F.conv2d(x, state[f"{prefix}.conv.weight"], padding=pad)
        return F.group_norm(x, 4, state[f"{prefix}.gn.weight"], state[f"{prefix}.gn.bias"], eps=1e-5)

    laterals = [unit(x, f"lateral_convs.{i}", 0) for i, x in enumerate(feats)]
    for i in (3, 2, 1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
    expected = [unit(x, f"fpn_convs.{i}", 1) for i, x in enumerate(laterals)]
    expected.append(expected[-1][:, :, ::2, ::2])
    with torch.no_grad():
        got = fpn(feats)
    assert len(got) == 5 and all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))


def test_group_norm_settings_the_converter_cannot_run_are_named():
    cfg = copy.deepcopy(CONFIGS["htc++_beitv2_adapter_large_fpn_o365_coco"]["single_scale"]["model"])
    assert detector_heads_kwargs(cfg)["neck"][1]["norm"] == "GN"
    for norm, named in ((dict(type="GN"), "num_groups"), (dict(type="GN", num_groups=32, eps=1e-6), "eps"),
                        (dict(type="GN", num_groups=32, affine=False), "affine"), (dict(type="LN"), "BatchNorm")):
        bad = copy.deepcopy(cfg)
        bad["neck"][1]["norm_cfg"] = norm
        with pytest.raises(ValueError, match=named):
            detector_heads_kwargs(bad)
    bad = copy.deepcopy(cfg)
    bad["roi_head"]["bbox_head"][0]["norm_cfg"] = dict(type="GN", num_groups=32)
    with pytest.raises(ValueError, match="bbox_head.0.norm_cfg"):
        detector_heads_kwargs(bad)
    with pytest.raises(ValueError, match="num_groups"):
        FPN([8], 10, norm="GN", num_groups=4)
    with pytest.raises(ValueError, match="norm"):
        FPN([8], 8, norm="LN")
