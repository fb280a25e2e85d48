"""What vitadapter writes never costs a user a file: outputs that would replace an input of the same
run are refused, destinations are checked before the work, every write is atomic (a full disk
leaves the old file and no debris), a folder re-saved while it is read never gives a mixed model."""
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitadapter
from vitadapter import hub
from vitadapter.cli import main
from vitadapter.integrations.onnx import export_onnx
from vitadapter.weights.staging import append_line, save_image, write_atomically

TINY = dict(embed_dim=24, depth=1, num_heads=3, deform_num_heads=3, conv_inplane=8, interaction_indexes=[0],
            vit_feature_source="final")
# for the children below: the package of this checkout, one thread
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(vitadapter.__file__).parents[1]))


def picture(path: Path, colour: str) -> Path:
    Image.new("RGB", (40, 32), colour).save(path)
    return path


def contents(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- outputs that are inputs -------------------------------------------------------------------------


def folder_of_images(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    picture(images / "x.png", "red")
    picture(images / "x.label.png", "blue")  # an input that segment's output for x.png would replace
    return images


@pytest.mark.parametrize("case", ["segment-folder", "features-folder", "features-image", "features-other-path", "hard-link"])
def test_outputs_never_replace_an_input_of_the_same_run(tmp_path, capsys, case):
    images = folder_of_images(tmp_path)
    (tmp_path / "alias").symlink_to(images)
    os.link(images / "x.png", tmp_path / "linked.png")
    argv, victim = {
        "segment-folder": (["segment", str(images), "--out", str(images)], "x.label.png"),
        "features-folder": (["features", str(images), "--out", str(images)], "x.png"),
        "features-image": (["features", str(images / "x.png"), "--out", str(images / "x.png")], "x.png"),
        # the same file through a link to its folder: compared by file, not by name
        "features-other-path": (["features", str(images / "x.png"), "--out", str(tmp_path / "alias" / "x.png")], "x.png"),
        "hard-link": (["features", str(images / "x.png"), "--out", str(tmp_path / "linked.png")], "x.png"),
    }[case]
    before = contents(tmp_path)
    assert main(argv + ["--size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitadapter: error: --out ") and err.count("\n") == 1, err
    assert "would replace" in err and str(images / victim) in err and "pick another --out" in err
    assert contents(tmp_path) == before


def test_outputs_beside_the_inputs_are_fine_where_they_replace_none(tmp_path, capsys):
    """The refusal is about files, not folders."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 32), "red").save(images / "x.jpg")
    assert main(["features", str(images), "--out", str(images), "--size", "64"]) == 0
    assert sorted(p.name for p in images.iterdir()) == ["x.jpg", "x.png"]


# ---- destinations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symlink", "folder"])
def test_export_onnx_checks_its_destination_before_any_work(tmp_path, kind):
    target = tmp_path / "precious.onnx"
    target.write_bytes(b"the user's own file")
    out = tmp_path / "m.onnx"
    if kind == "symlink":
        out.symlink_to(target)
    else:
        out.mkdir()
    script = textwrap.dedent(f"""
        import sys
        from vitadapter.cli import main
        assert main(["export-onnx", "vit_adapter_t", {str(out)!r}]) == 2
        assert "torch" not in sys.modules  # refused before the model, let alone the export
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    words = "is a symbolic link (to " if kind == "symlink" else "is a folder"
    assert done.stderr.startswith(f"vitadapter: error: export-onnx {out} {words}"), done.stderr
    assert target.read_bytes() == b"the user's own file"
    assert out.is_symlink() if kind == "symlink" else list(out.iterdir()) == []


def test_export_onnx_refuses_a_folder_before_exporting(tmp_path, monkeypatch):
    def export(*args, **kwargs):
        raise AssertionError("the export ran")

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(ValueError, match=f"path {tmp_path} is a folder"):
        export_onnx(vitadapter.create_model("vit_adapter_t", **TINY), tmp_path, size=(64, 64))


def test_library_writes_replace_a_link_never_the_file_it_points_to(tmp_path):
    target = picture(tmp_path / "elsewhere.png", "blue")
    before = target.read_bytes()
    link = tmp_path / "link.png"
    link.symlink_to(target)
    save_image(Image.new("RGB", (8, 8), "red"), link)
    assert target.read_bytes() == before
    assert not link.is_symlink() and Image.open(link).getpixel((0, 0)) == (255, 0, 0)


# ---- a full disk -------------------------------------------------------------------------------------


def with_file_size_limit(limit: int) -> None:
    """In the child: files may not grow past ``limit`` bytes; a write beyond fails with EFBIG
    instead of killing the process (SIGXFSZ ignored), as on a full disk."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


SAVE_OVER = """
import sys, torch, vitadapter
torch.manual_seed(1)
vitadapter.save_pretrained(vitadapter.create_model("vit_adapter_t", **{tiny}), sys.argv[1])
"""
EXPORT_OVER = """
import sys, vitadapter
from vitadapter.integrations.onnx import export_onnx
export_onnx(vitadapter.create_model("vit_adapter_t", **{tiny}), sys.argv[1], size=(64, 64), dynamic=False)
"""


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    hub.save_pretrained(vitadapter.create_model("vit_adapter_t", **TINY), folder)
    return folder


@pytest.mark.parametrize("what", ["features picture", "save_pretrained folder", "ONNX file"])
def test_a_full_disk_keeps_the_old_file_and_leaves_no_debris(tmp_path, tiny_folder, what):
    work = tmp_path / "work"
    work.mkdir()
    image = picture(tmp_path / "cat.png", "red")
    if what == "features picture":
        old = picture(work / "pyramid.png", "blue")
        command = ["-m", "vitadapter", "features", str(image), "--size", "64", "--out", str(old)]
    elif what == "save_pretrained folder":
        old = work / "tiny"
        old.mkdir()
        for name in ("config.json", "model.safetensors"):
            (old / name).write_bytes((tiny_folder / name).read_bytes())
        command = ["-c", SAVE_OVER.format(tiny=TINY), str(old)]
    else:
        old = work / "m.onnx"
        old.write_bytes(b"an earlier export")
        command = ["-c", EXPORT_OVER.format(tiny=TINY), str(old)]
    before = contents(work)
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300, env=ENV,
                          preexec_fn=lambda: with_file_size_limit(16_384))
    assert done.returncode != 0, done.stdout
    assert "File too large" in done.stderr, done.stderr[-2000:]
    assert contents(work) == before  # the old file(s), byte for byte, and nothing else


def test_a_log_line_that_does_not_fit_is_undone(tmp_path):
    log = tmp_path / "log.jsonl"
    append_line(log, json.dumps({"iteration": 1}))
    before = log.read_bytes()
    script = f"from vitadapter.weights.staging import append_line\nappend_line({str(log)!r}, 'x' * 1000)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=ENV,
                          preexec_fn=lambda: with_file_size_limit(len(before) + 10))
    assert done.returncode != 0 and ("File too large" in done.stderr or "short write" in done.stderr), done.stderr
    assert log.read_bytes() == before


def test_write_atomically_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")

    def half_then_fail(staging: Path) -> None:
        staging.write_text("ne")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, half_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"] and path.read_text() == "old"


# ---- a folder re-saved while it is read ---------------------------------------------------------------

# Saves two models into one folder, in turn, as fast as it can: A (weights all 1, mean 0.1 in its
# config) and B (weights all 2, mean 0.2). Prints "saved" after the first save.
RESAVER = """
import sys, torch, vitadapter
models = []
for value in (1.0, 2.0):
    model = vitadapter.create_model("vit_adapter_t", **{tiny})
    with torch.no_grad():
        for p in model.state_dict().values():
            p.fill_(value)
    models.append((model, dict(mean=(value / 10,) * 3)))
for i in range(int(sys.argv[2])):
    model, cfg = models[i % 2]
    vitadapter.save_pretrained(model, sys.argv[1], cfg)
    if i == 0:
        print("saved", flush=True)
"""


def test_a_folder_resaved_while_it_loads_never_gives_a_mixed_model(tmp_path):
    folder = tmp_path / "model"
    writer = subprocess.Popen([sys.executable, "-c", RESAVER.format(tiny=TINY), str(folder), "100"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert writer.stdout.readline() == "saved\n"
        loads, refused = 0, 0
        while writer.poll() is None or loads + refused == 0:
            try:
                model = vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
            except OSError as e:
                assert "came from different saves" in str(e)
                refused += 1
                continue
            loads += 1
            mean = model.pretrained_cfg["mean"][0]
            value = next(model.parameters()).flatten()[0].item()
            assert value == mean * 10, f"config of save {mean * 10:g}, weights of save {value:g}, in load {loads}"
    finally:
        writer.kill()
        writer.wait(timeout=60)
    assert loads > 0, refused


def test_a_folder_whose_files_come_from_two_saves_is_refused(tmp_path, tiny_folder):
    """What an interrupted save leaves (the new weights, the old config.json): never loaded as one model."""
    folder = tmp_path / "model"
    vitadapter.save_pretrained(vitadapter.create_model("vit_adapter_t", **TINY), folder)
    (folder / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes())
    with pytest.raises(OSError, match=f"local-dir:{folder}: its config.json and model.safetensors came from different saves"):
        vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
    # a folder put together from files without save ids cannot be checked, and loads as before
    config = json.loads((folder / "config.json").read_text())
    del config[hub.SAVE_ID]
    (folder / "config.json").write_text(json.dumps(config))
    vitadapter.create_model(f"local-dir:{folder}", pretrained=True)
