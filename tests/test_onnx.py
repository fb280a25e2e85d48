"""ONNX export (``vitadapter export-onnx`` and ``integrations.onnx.export_onnx``) run in onnxruntime
at sizes other than the export size, against PyTorch."""
import numpy as np
import pytest
import torch

import vitadapter
from vitadapter.cli import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# The smallest model with every part: one interaction (injector, extractor and the two extra
# extractors), the spatial prior module, the transposed conv and the four norms. The export itself
# is what takes time (tens of seconds on a small CPU), so one file serves the module.
TINY = dict(embed_dim=24, depth=1, num_heads=3, deform_num_heads=3, conv_inplane=8, interaction_indexes=[0],
            vit_feature_source="final")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model in eval mode, path of its ONNX file) written by the command from a saved folder."""
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = vitadapter.create_model("vit_adapter_t", **TINY).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval mode matters
        for norm in (model.norm1, model.norm2, model.norm3, model.norm4):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    vitadapter.save_pretrained(model, folder / "tiny")
    out = folder / "tiny.onnx"
    assert main(["export-onnx", f"local-dir:{folder / 'tiny'}", str(out), "--size", "64", "96", "--pretrained"]) == 0
    return model, out


@pytest.mark.parametrize("shape", [(1, 3, 64, 96), (3, 3, 70, 50), (2, 3, 200, 300), (1, 3, 32, 32)])
def test_onnxruntime_matches_pytorch_at_any_batch_and_size(exported, shape):
    model, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = torch.randn(*shape)
    with torch.no_grad():
        reference = model(image)
    outputs = session.run(None, {"image": image.numpy()})
    assert [o.shape for o in outputs] == [tuple(r.shape) for r in reference]
    for out, ref in zip(outputs, reference):
        np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_the_graph_samples_with_gridsample_and_has_no_loops(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "GridSample" in ops and "Loop" not in ops and not any(node.domain.startswith("vitadapter") for node in graph.node)
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [o.name for o in graph.output] == ["stride4", "stride8", "stride16", "stride32"]


def test_a_graph_that_cannot_follow_the_size_says_to_export_at_a_fixed_size(monkeypatch, tmp_path):
    from vitadapter.integrations import onnx as onnx_export

    def refuse(*args, **kwargs):
        raise RuntimeError("Constraints violated (height)!\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    model = vitadapter.create_model("vit_adapter_t", **TINY)
    with pytest.raises(ValueError, match=r"does not follow the input size \(RuntimeError: Constraints violated.*dynamic=False"):
        onnx_export.export_onnx(model, tmp_path / "m.onnx", size=(64, 64))
    assert model.training  # put back in its mode


@pytest.mark.parametrize("argv, fragment", [
    (["vit_adapter_q", "m.onnx"], "export-onnx vit_adapter_q: unknown model"),
    (["vit_adapter_t", "m.pt"], "name a .onnx file"),
    (["vit_adapter_t", "absent/m.onnx"], "the folder absent does not exist"),
    (["vit_adapter_t", "m.onnx", "--size", "16", "64"], "--size 16 64: height and width must be at least 32"),
    (["vit_adapter_t", "m.onnx", "--weights", "none.pth"], "--weights none.pth: no such file"),
])
def test_export_onnx_argument_errors_are_one_line(argv, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export-onnx", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitadapter: error: ") and err.count("\n") == 1 and fragment in err, err
    assert list(tmp_path.iterdir()) == []
