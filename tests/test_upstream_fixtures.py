"""The port against outputs of the upstream code itself (tests/fixtures/upstream, random weights)."""
import pytest
import torch

import vitadapter
from conftest import load_fixture, max_rel_err


@pytest.mark.parametrize("name", ["seg_vit", "det_vit", "seg_uniperceiver", "det_uniperceiver"])
def test_matches_upstream_fixture(name):
    meta, ckpt, io = load_fixture(name)
    model = vitadapter.load_upstream(meta["backbone"], meta["codebase"], ckpt).eval()
    with torch.no_grad():
        outs = model(io["input"])
    assert [list(o.shape) for o in outs] == meta["output_shapes"]
    for i, out in enumerate(outs):
        assert max_rel_err(out, io[f"out{i}"]) <= 1e-4, f"level {i}"


def test_codebases_differ_on_same_weights():
    """Same checkpoint, the two forwards: only the ViT-feature source differs, and it matters."""
    meta, ckpt, io = load_fixture("seg_vit")
    seg = vitadapter.load_upstream(meta["backbone"], "segmentation", ckpt).eval()
    det = vitadapter.load_upstream(meta["backbone"], "detection", ckpt).eval()
    with torch.no_grad():
        a, b = seg(io["input"]), det(io["input"])
    # the last level gets the final ViT output in both; the others get earlier interactions' in seg
    assert torch.equal(a[3], b[3])
    for level in range(3):
        assert max_rel_err(b[level], a[level]) > 1e-2


@pytest.mark.parametrize("name", ["seg_vit", "det_vit", "seg_uniperceiver", "det_uniperceiver"])
def test_batch_items_are_independent(name):
    """A batch of two images gives each image's single-image result (eval mode)."""
    meta, ckpt, io = load_fixture(name)
    model = vitadapter.load_upstream(meta["backbone"], meta["codebase"], ckpt).eval()
    other = torch.randn_like(io["input"])
    with torch.no_grad():
        both = model(torch.cat([io["input"], other]))
        single = model(other)
    for i in range(4):
        assert max_rel_err(both[i][:1], io[f"out{i}"]) <= 1e-4
        assert max_rel_err(both[i][1:], single[i]) <= 1e-4


def test_checkpoint_dict_and_wrappers():
    """A loaded dict, a 'model' wrapper and DDP 'module.' prefixes all load the same weights."""
    meta, ckpt, io = load_fixture("seg_vit")
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    wrapped = {"model": {f"module.{k}": v for k, v in raw.items()}}
    model = vitadapter.load_upstream(meta["backbone"], meta["codebase"], wrapped).eval()
    with torch.no_grad():
        out = model(io["input"])
    assert max_rel_err(out[0], io["out0"]) <= 1e-4
