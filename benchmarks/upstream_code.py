"""Upstream ViT-Adapter's own backbone, built on the CPU from a git snapshot of its repository.

Nothing of upstream is copied here: its segmentation ``ViTAdapter`` and the deformable-attention
module are read at run time from the snapshot that ``VITADAPTER_UPSTREAM`` names (a git directory of
``czczup/ViT-Adapter``, e.g. ``git clone --bare https://github.com/czczup/ViT-Adapter``). The
framework imports that code makes (mmcv, mmseg, the compiled CUDA op) are replaced by small
stand-ins: the op's stand-in calls upstream's own pure-PyTorch version (its CUDA op has no CPU
path), and SyncBatchNorm, which needs a process group, becomes BatchNorm2d with the same state.
"""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import warnings
from typing import Any, Mapping, Optional

import torch
from torch import nn

ENV = "VITADAPTER_UPSTREAM"
_SOURCES = ("segmentation/mmseg_custom/models/backbones", "detection/ops/functions", "detection/ops/modules")
# vitadapter model_args that upstream's ViTAdapter takes under the same name
_SAME_NAME = (
    "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "layer_scale", "conv_inplane", "n_points",
    "deform_num_heads", "deform_ratio", "init_values", "interaction_indexes", "with_cffn", "cffn_ratio",
    "add_vit_feature", "use_extra_extractor",
)
_loaded: Optional[types.ModuleType] = None


def snapshot() -> Optional[str]:
    """The git directory of the upstream snapshot, or None when ``VITADAPTER_UPSTREAM`` is unset."""
    return os.environ.get(ENV) or None


# upstream calls torch.meshgrid without indexing= in every forward
warnings.filterwarnings("ignore", message=r"torch\.meshgrid")


def build(model_args: Mapping[str, Any]) -> nn.Module:
    """Upstream's segmentation ViTAdapter for the configuration of a vitadapter model's
    ``model_args`` (global attention), in eval mode."""
    module = _upstream_module()
    kwargs = {k: model_args[k] for k in _SAME_NAME}
    size = model_args["pretrain_size"]
    model = module.ViTAdapter(pretrain_size=size, img_size=size, drop_path_rate=0.0, **kwargs)
    _replace_sync_batchnorm(model)
    return model.eval()


def _upstream_module() -> types.ModuleType:
    global _loaded
    if _loaded is None:
        root = _extract(snapshot() or _missing())
        _install_stand_ins()
        sys.path.insert(0, os.path.join(root, "detection"))  # upstream imports its op as `ops`
        # the backbones package without its __init__, which imports every variant and their frameworks
        package = types.ModuleType("upstream_backbones")
        package.__path__ = [os.path.join(root, _SOURCES[0])]
        sys.modules[package.__name__] = package
        import importlib

        with warnings.catch_warnings():  # its deprecated torch and timm imports, not ours to fix
            warnings.simplefilter("ignore")
            _loaded = importlib.import_module("upstream_backbones.vit_adapter")
    return _loaded


def _missing() -> str:
    raise SystemExit(f"set {ENV} to the git directory of a czczup/ViT-Adapter snapshot")


def _extract(git_dir: str) -> str:
    archive = subprocess.run(
        ["git", "--git-dir", git_dir, "archive", "HEAD", *_SOURCES], check=True, capture_output=True
    ).stdout
    root = tempfile.mkdtemp(prefix="vitadapter_upstream_")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return root


def _install_stand_ins() -> None:
    def module(name: str, **attrs: Any) -> None:
        sys.modules[name] = types.SimpleNamespace(__name__=name, **attrs)  # type: ignore[assignment]

    class Registry:
        @staticmethod
        def register_module(*args: Any, **kwargs: Any) -> Any:
            return lambda cls: cls

    def compiled_op_forward(value, shapes, level_start_index, locations, weights, im2col_step):
        from ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch

        return ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    module("mmseg")
    module("mmseg.models")
    module("mmseg.models.builder", BACKBONES=Registry())
    module("mmseg.utils", get_root_logger=lambda *args, **kwargs: logging.getLogger("upstream"))
    module("mmcv")
    module("mmcv.runner", BaseModule=nn.Module)
    module("mmcv_custom", my_load_checkpoint=None, load_checkpoint=None)
    module("MultiScaleDeformableAttention", ms_deform_attn_forward=compiled_op_forward)


def _replace_sync_batchnorm(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.SyncBatchNorm):
                plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)


if __name__ == "__main__":
    import vitadapter

    ours = vitadapter.create_model("vit_adapter_t").eval()
    theirs = build(ours.model_args)
    print(f"upstream vit_adapter_t: {sum(p.numel() for p in theirs.parameters()):,} parameters")
    with torch.inference_mode():
        print([tuple(level.shape) for level in theirs(torch.randn(1, 3, 64, 96))])
