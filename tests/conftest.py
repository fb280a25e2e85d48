import json
from pathlib import Path

import pytest
import torch
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
