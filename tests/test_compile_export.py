"""The whole model under torch.compile (no graph break) and torch.export, equal to eager."""
import torch

import vitadapter


def tiny_model():
    return vitadapter.create_model(
        "vit_adapter_t", embed_dim=24, depth=4, num_heads=3, deform_num_heads=3, conv_inplane=8
    ).eval()


def test_compile_fullgraph_equals_eager():
    model, image = tiny_model(), torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(image)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(image)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, ref))


def test_export_equals_eager():
    model, image = tiny_model(), torch.randn(2, 3, 70, 50)
    with torch.no_grad():
        ref = model(image)
    program = torch.export.export(model, (image,))
    out = program.module()(image)
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, ref))
