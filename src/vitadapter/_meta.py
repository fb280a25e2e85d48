"""Models built on the meta device without the cost of initialising values that do not exist.

``with torch.device("meta")`` builds a model of any size in no memory, but every initialiser still
runs: timm's ``trunc_normal_`` alone is five in-place ops per parameter, each dispatched to PyTorch's
Python meta implementations (milliseconds each, ~0.3 s for one ViT-Adapter). A meta tensor has no
values, so an in-place op that only writes values (no other tensor involved, nothing autograd would
refuse) changes nothing; ``meta_device()`` returns the tensor for those instead of dispatching them.
Shapes, dtypes, parameter counts and ``model_args`` are what ``torch.device("meta")`` gives.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

# The initialisers of torch.nn.init (a torch function runs its inner calls past this mode, so they
# are named themselves) and the Tensor methods that timm.layers' call; each writes values in place
VALUE_ONLY = frozenset({
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_", "kaiming_normal_",
    "xavier_uniform_", "xavier_normal_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_", "clamp_min_",
    "clamp_max_", "fill_", "zero_", "exp_", "log_", "sqrt_", "abs_", "neg_",
})


class _SkipMetaValueWrites(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in VALUE_ONLY and args and isinstance(args[0], torch.Tensor):
            target = args[0]
            if (
                target.is_meta
                and not (target.requires_grad and torch.is_grad_enabled())  # autograd would refuse a leaf
                and not any(isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values()))
            ):
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device("meta")`` for building models whose values are never read."""
    with torch.device("meta"), _SkipMetaValueWrites():
        yield
