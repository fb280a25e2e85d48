"""Reading weight files safely: nothing in a file runs, and every entry is checked before use.

``read_checkpoint`` reads ``torch.save`` files (``.pth``, ``.pth.tar``) and upstream's ``.zip``
releases around one; ``read_weights`` reads those and safetensors files. ``unwrap`` finds the state
dict inside a checkpoint and checks each entry; ``check_state_dict`` names everything that keeps a
state dict from loading strictly into a model. This module knows no model class.
"""
from __future__ import annotations

import math
import os
import pickle
import shutil
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .staging import staging_folder

Checkpoint = Union[str, os.PathLike, Mapping[str, Any]]

def read_checkpoint(path: Union[str, os.PathLike]) -> Mapping[Any, Any]:
    """Read a ``torch.save`` file (``.pth``, ``.pth.tar``) or an upstream ``.zip`` release around one.

    Nothing in the file runs: ``weights_only=True`` first, and files whose ``meta`` pickles other
    objects (mmcv configs, numpy scalars) are read with an unpickler that resolves only tensor-building
    globals and turns every other global into an inert placeholder (README, "Security"). A file that
    holds anything but a dict (a tensor, a list, a string) is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _is_release_archive(path):
        # a staging folder, so that a killed run's unpacked copy is removed by the next one
        with staging_folder(Path(tempfile.gettempdir()) / "vitadapter-unpacked") as folder:
            return as_dict(_read_torch_file(_extract_checkpoint(path, folder), shown=path), path)
    return as_dict(_read_torch_file(path, shown=path), path)


def read_weights(path: Union[str, os.PathLike]) -> Any:
    """A weights file: safetensors, or a ``torch.save`` file / upstream ``.zip`` (``read_checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if not (path.suffix == ".safetensors" or has_safetensors_header(path)):
        return read_checkpoint(path)
    try:
        return load_file(path)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"could not read {path}: the safetensors file is truncated or corrupt ({e})") from e


def has_safetensors_header(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        start = f.read(9)
    return len(start) == 9 and start[8:] == b"{"


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise a ``ValueError`` naming every missing, unexpected, mis-shaped or mistyped key, and every
    tensor holding NaN or infinite values (loading would cast integers and keep NaNs silently)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shared = sorted(set(state) & set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in shared
        if state[k].shape != expected[k].shape
    ]
    mistyped = [
        f"{k}: checkpoint {state[k].dtype} vs model {expected[k].dtype}"
        for k in shared
        if _kind(state[k]) != _kind(expected[k])
    ]
    non_finite = [k for k in shared if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
        ("dtype mismatches", mistyped),
        ("NaN or infinite values", non_finite),
    ):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise ValueError(f"checkpoint does not fit the model{_size_hint(expected, state)}; " + "; ".join(problems))


def _size_hint(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """Say which size differs, so the fix (another architecture) is obvious."""
    width, pos = "vit.patch_embed.proj.weight", "vit.pos_embed"
    if width in state and state[width].dim() == 4 and state[width].shape[0] != expected[width].shape[0]:
        theirs, ours = state[width].shape[0], expected[width].shape[0]
        return f" (a {theirs}-wide ViT, the model's is {ours} wide: use the matching architecture)"
    if pos in state and state[pos].dim() == 3 and state[pos].shape != expected[pos].shape:
        theirs, ours = _grid(state[pos].shape[1]), _grid(expected[pos].shape[1])
        return f" (a {theirs} position grid, the model's is {ours}: pretrain_size differs)"
    return ""


def _grid(cells: int) -> str:
    side = math.isqrt(cells)
    return f"{side}x{side}" if side * side == cells else f"{cells}-cell"



def unwrap(checkpoint: Mapping[str, Any], split_backbone: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict inside a checkpoint: ``state_dict``/``model`` wrappers and ``module.`` prefixes
    go; when keys carry ``backbone.`` (and ``split_backbone``), the rest (task heads, necks) is dropped.
    Returns (state, dropped), the kept entries checked by ``_check_entry``: every checkpoint a
    vitadapter model loads passes here."""
    state = checkpoint
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    for key in state:
        if not isinstance(key, str):
            raise ValueError(f"checkpoint key {key!r} is a {type(key).__name__}, not a string")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    dropped = []
    if split_backbone and any(k.startswith("backbone.") for k in state):
        dropped = sorted(k for k in state if not k.startswith("backbone."))
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    for key, value in state.items():
        _check_entry(key, value)
    return state, dropped


# Tensors whose shapes the conversions read before the model's own shape check, by key or last key
# part, and their number of dimensions: prefix tokens and position grids (1, tokens, width), the patch
# embedding (width, channels, patch, patch), BEiT's relative position tables (rows, heads).
_RANKS = {
    "pos_embed": 3, "cls_token": 3, "dist_token": 3, "reg_token": 3, "patch_embed.proj.weight": 4,
    "relative_position_bias_table": 2,
}


def _check_entry(key: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"checkpoint entry {key!r} is not a tensor ({type(value).__name__})")
    if value.layout is not torch.strided:
        raise ValueError(f"checkpoint entry {key!r} is a {value.layout} tensor; only dense tensors load")
    rank = _RANKS.get(key, _RANKS.get(key.rsplit(".", 1)[-1]))
    if rank is not None and value.dim() != rank:
        raise ValueError(f"checkpoint entry {key!r} has shape {tuple(value.shape)}, expected {rank} dimensions")


def as_dict(checkpoint: Any, source: Any) -> Mapping[Any, Any]:
    """What a checkpoint holds must be a dict: a string in it is content, never a path to follow."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must hold a dict of tensors; {source} holds a {type(checkpoint).__name__}")
    return checkpoint


def _kind(tensor: torch.Tensor) -> tuple[bool, bool, bool]:
    return tensor.is_floating_point(), tensor.is_complex(), tensor.dtype == torch.bool



# ---- reading torch.save files without running code ------------------------------------------------

_CHECKPOINT_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin")
# Bounds on unpacking a release .zip (its one checkpoint is a few hundred MB to a few GB of weights,
# which deflate barely shrinks; a 3 MB archive can declare 3 GiB of zeros): the member count, the
# checkpoint's declared size, and its compression ratio once it is large enough to matter.
MAX_ARCHIVE_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 16 << 30
MAX_COMPRESSION_RATIO = 20
_ANY_RATIO_BELOW = 64 << 20
# Globals a state dict needs (tensor and parameter rebuilding, containers); both spellings of the
# builtins module because protocol-2 pickles, torch.save's default, write "__builtin__".
_SAFE_GLOBALS = frozenset({
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch.Size",
    "torch.device",
    "_codecs.encode",
    *(f"{module}.{name}" for module in ("builtins", "__builtin__") for name in ("set", "frozenset", "slice")),
})


class InertGlobal:
    """Stands in for a pickled global outside the allow-list: keeps what the pickle hands it, runs nothing."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # containers (e.g. mmcv's ConfigDict, a dict subclass) are filled item by item
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("elements", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("elements", []).extend(items)

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``_SAFE_GLOBALS`` and torch dtypes; every other global becomes an ``InertGlobal``."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or f"{module}.{name}" in _SAFE_GLOBALS:
            return super().find_class(module, name)
        return type(name, (InertGlobal,), {"qualified_name": f"{module}.{name}"})


# torch.load takes a pickle *module*; torch's own unpickler subclasses its ``Unpickler`` (adding tensor
# storage handling) and legacy files also go through its ``load``.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="vitadapter.restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
)


def _read_torch_file(path: Path, shown: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # weights_only refuses globals outside torch's allow-list, such as upstream's mmcv/numpy
            # ``meta``; the restricted unpickler reads them as inert placeholders instead.
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception as e:  # a damaged file fails in any of pickle's, zip's or torch's error types
        # Not chained, and only the error's first line: torch's messages advise re-running with
        # weights_only=False, which would run code from the file.
        line = next(iter(str(e).strip().splitlines()), "")
        reason = type(e).__name__ + ("" if "weights_only" in line or not line else f": {line[:200]}")
        raise ValueError(f"could not read {shown}: it is truncated, corrupt or not a checkpoint ({reason})") from None


def _is_release_archive(path: Path) -> bool:
    """A zip that is not itself a torch.save file (those are zips holding a ``data.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return not any(name.endswith("data.pkl") for name in archive.namelist())
    except zipfile.BadZipFile as e:
        raise ValueError(f"could not read {path}: the zip archive is corrupt ({e})") from e


def _extract_checkpoint(archive_path: Path, folder: Path) -> Path:
    """The one checkpoint file inside an upstream ``.zip`` release, extracted into ``folder``.

    Nothing else is extracted, and that file only within bounds (``_check_unpacked_size``); zipfile
    stops reading a member at the size the archive declares for it and checks its CRC.
    """
    try:
        with zipfile.ZipFile(archive_path) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_ARCHIVE_MEMBERS:
                raise ValueError(
                    f"refusing to unpack {archive_path}: it lists {len(infos)} members, more than the "
                    f"{MAX_ARCHIVE_MEMBERS} a release archive is allowed"
                )
            members = [m for m in infos if m.filename.endswith(_CHECKPOINT_SUFFIXES)]
            if len(members) != 1:
                names = ", ".join(m.filename for m in infos[:5]) or "nothing"
                kinds = "/".join(_CHECKPOINT_SUFFIXES)
                raise ValueError(f"{archive_path} should hold exactly one checkpoint ({kinds}), it holds {names}")
            _check_unpacked_size(archive_path, members[0], folder)
            # only the base name is used, so member paths cannot point outside ``folder``
            target = folder / Path(members[0].filename).name
            with archive.open(members[0]) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"could not unpack {archive_path}: the zip archive is truncated or corrupt ({e})") from e
    return target


def _check_unpacked_size(archive_path: Path, member: zipfile.ZipInfo, folder: Path) -> None:
    size, packed = member.file_size, member.compress_size
    free = shutil.disk_usage(folder).free
    if size > MAX_UNPACKED_BYTES:
        problem = f"more than vitadapter's ceiling of {MAX_UNPACKED_BYTES} bytes"
    elif size > _ANY_RATIO_BELOW and size > MAX_COMPRESSION_RATIO * packed:
        problem = f"{size // max(packed, 1)} times its compressed size, while weights barely compress"
    elif size > free:
        problem = f"more than the {free} bytes free in {folder}"
    else:
        return
    raise ValueError(f"refusing to unpack {archive_path}: {member.filename} would take {size} bytes, {problem}")
