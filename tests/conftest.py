import json
import os
from pathlib import Path

import pytest

# The suite runs thousands of small ops, where a second intra-op thread costs more than it gains (on
# this project's 2-core machine: 3 min 38 s instead of 3 min 56 s, a fifth less CPU time). Set
# before torch loads; subprocess tests inherit it. An explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

# Without a GPU, the Triton kernels are tested through Triton's interpreter; the variable must be
# set before the kernels are imported (vitadapter imports them lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"


def load_fixture(name: str):
    """(config json, checkpoint path, io tensors) of one upstream golden fixture."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return meta, FIXTURES / f"{name}.pth", load_file(FIXTURES / f"{name}_io.safetensors")


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_finish(session):
    """A test module with ``start_in_background(config)`` (test_msda_sass.py: its kernels compile in
    child processes for minutes) gets it called once the selected tests are known, so the work runs
    beside the rest of the suite."""
    if session.config.option.collectonly:
        return
    modules = {item.module for item in session.items if getattr(item, "module", None) is not None}
    for module in modules:
        if hasattr(module, "start_in_background"):
            module.start_in_background(session.config)


def backbone_archs() -> list[str]:
    """Registered architectures that return a pyramid (segmentors excluded)."""
    import timm

    from vitadapter.models import BACKBONE_MODULES

    return sorted(a for m in BACKBONE_MODULES for a in timm.list_models(module=m))


def backbone_tags() -> list[str]:
    """``arch.tag`` names with weights whose architecture is a backbone."""
    import vitadapter

    archs = set(backbone_archs())
    return [n for n in vitadapter.list_pretrained() if n.split(".", 1)[0] in archs]
