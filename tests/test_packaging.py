"""The checkout's layout must not change what Python imports when it is started from the clone's root.

`python -m pytest`, `python -c` and notebooks put the working directory first on ``sys.path``, so a
regular package at the root named like a PyPI package would shadow it: the repository's ``kernels/``
(installed as ``vitadapter.kernels``) once hid the PyPI package ``kernels`` that transformers imports.
"""
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, **env},
    )


def test_a_top_level_package_named_kernels_wins_over_the_checkouts_folder(tmp_path):
    # A stand-in for any installed regular package of that name, placed after the working directory
    # on sys.path as site-packages is.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MARK = 'installed'\n")
    done = _run_from_root(
        """
        import sys, kernels
        assert sys.path[0] == '', sys.path[:2]
        print(kernels.MARK)
        from vitadapter.kernels import msda  # the project's own kernels still load under their name
        print(msda.__name__)
        """,
        PYTHONPATH=str(tmp_path),
    )
    if done.returncode and "No module named 'triton'" in done.stderr:
        pytest.skip("Triton does not import on this platform")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["installed", "vitadapter.kernels.msda"]


def test_transformers_timm_backbone_imports_from_the_checkouts_root():
    pytest.importorskip("transformers")
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package 'kernels' is not installed here")
    done = _run_from_root(
        """
        import kernels, vitadapter
        from transformers import TimmBackbone, TimmBackboneConfig
        import torch
        backbone = TimmBackbone(TimmBackboneConfig(backbone="vit_adapter_t", use_pretrained_backbone=False))
        with torch.no_grad():
            print(len(backbone(torch.randn(1, 3, 64, 64)).feature_maps), kernels.__file__)
        """
    )
    assert done.returncode == 0, done.stderr
    count, where = done.stdout.split()
    assert int(count) >= 1
    assert not Path(where).resolve().is_relative_to(ROOT)
