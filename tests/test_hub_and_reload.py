"""torch.hub entry points, and models saved by other libraries reloading in a fresh process."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitadapter

ROOT = Path(__file__).parents[1]
TINY = dict(embed_dim=24, depth=4, num_heads=3, deform_num_heads=3, conv_inplane=8)


def test_hubconf_has_an_entry_point_per_architecture():
    spec = importlib.util.spec_from_file_location("vitadapter_hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    public = {n for n in dir(hubconf) if not n.startswith("_") and callable(getattr(hubconf, n))}
    assert public == set(vitadapter.list_models())
    model = torch.hub.load(str(ROOT), "vit_adapter_t_det", source="local", trust_repo=True, **dict(TINY, window_size=[2, None] * 2))
    assert model.vit_feature_source == "final" and model.embed_dim == 24


def run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_smp_and_transformers_checkpoints_reload_after_import_vitadapter(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    transformers = pytest.importorskip("transformers")
    from vitadapter.integrations.transformers import backbone_config

    unet = smp.Unet("tu-vit_adapter_t", encoder_weights=None, classes=3)
    unet.save_pretrained(str(tmp_path / "unet"))
    upernet = transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
        backbone_config=backbone_config("vit_adapter_t"), hidden_size=16, auxiliary_in_channels=192, num_labels=3))
    upernet.save_pretrained(str(tmp_path / "upernet"))
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.save({"unet": unet.eval()(image), "upernet": upernet.eval()(pixel_values=image).logits, "image": image,
                    "upernet_state": upernet.state_dict()}, tmp_path / "expected.pt")

    fresh = (
        "import torch, segmentation_models_pytorch as smp\n"
        "smp.from_pretrained('unet')\n"
    )
    failed = run(fresh, tmp_path)
    assert failed.returncode != 0 and "Unknown model (vit_adapter_t)" in failed.stderr

    reload = (
        "import torch, vitadapter, segmentation_models_pytorch as smp, transformers\n"
        "expected = torch.load('expected.pt')\n"
        "unet = smp.from_pretrained('unet').eval()\n"
        "upernet = transformers.UperNetForSemanticSegmentation.from_pretrained('upernet').eval()\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(unet(expected['image']), expected['unet'])\n"
        "    logits = upernet(pixel_values=expected['image']).logits\n"
        "state = upernet.state_dict()\n"
        "assert all(torch.equal(state[k], v) for k, v in expected['upernet_state'].items())\n"
        # transformers 5 computes with the weights where safetensors mapped them; oneDNN's rounding
        # follows the buffers' alignment, so equal weights give logits equal to float32 rounding only
        "torch.testing.assert_close(logits, expected['upernet'], rtol=0, atol=1e-6 * expected['upernet'].abs().max().item())\n"
    )
    done = run(reload, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
