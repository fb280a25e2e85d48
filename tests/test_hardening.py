"""Hostile and unlucky input: stalled and trickling servers, archive bombs, file modes, killed runs,
malformed checkpoints and configs, odd image dtypes. Servers run on 127.0.0.1 with short limits."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES
from vitadapter import hub
from vitadapter.cli import main

CONVERT_CFG = json.loads((FIXTURES / "seg_upernet.json").read_text())


def upstream_config(tmp_path: Path, backbone: dict = None, **extra) -> Path:
    path = tmp_path / "cfg.json"
    spec = dict(codebase="segmentation", backbone=backbone or CONVERT_CFG["backbone"], **extra)
    path.write_text(json.dumps(spec))
    return path


def convert_argv(tmp_path: Path, dst: Path) -> list:
    return ["convert", str(FIXTURES / "seg_upernet.pth"), str(dst), "--upstream-config", str(upstream_config(tmp_path))]


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- file modes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_usual_umask_modes(tmp_path, umask, capsys):
    previous = os.umask(umask)
    try:
        assert main(convert_argv(tmp_path, tmp_path / "converted")) == 0
    finally:
        os.umask(previous)
    folder = tmp_path / "converted"
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("config.json", "model.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---- interrupted and concurrent convert -----------------------------------------------------------------

# Runs convert in a child whose safetensors writer stops for good once the file is written, so the
# parent can kill it with its staging folder on disk.
STALLED_CONVERT = """
import sys, time
from vitadapter import hub
from vitadapter.cli import main

save_file = hub.save_file

def save_then_stall(*args, **kwargs):
    save_file(*args, **kwargs)
    print("written", flush=True)
    time.sleep(600)

hub.save_file = save_then_stall
main(sys.argv[1:])
"""


def test_a_killed_convert_leaves_staging_that_the_next_run_removes(tmp_path, capsys):
    dst = tmp_path / "out" / "converted"
    argv = convert_argv(tmp_path, dst)
    child = subprocess.Popen([sys.executable, "-c", STALLED_CONVERT, *argv], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "written\n"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert len(leftovers(dst.parent)) == 1 and not dst.exists()

    assert main(argv) == 0
    assert sorted(p.name for p in dst.parent.iterdir()) == ["converted"]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]


def test_a_convert_that_loses_the_race_for_its_destination_says_it_exists(tmp_path, capsys, monkeypatch):
    dst = tmp_path / "converted"
    save_file = hub.save_file

    def other_convert_finishes_first(*args, **kwargs):
        save_file(*args, **kwargs)
        dst.mkdir()
        (dst / "config.json").write_text("{}")

    monkeypatch.setattr(hub, "save_file", other_convert_finishes_first)
    assert main(convert_argv(tmp_path, dst)) == 2
    err = capsys.readouterr().err
    assert str(dst) in err and "already exists" in err
    assert (dst / "config.json").read_text() == "{}"
    assert leftovers(tmp_path) == []
