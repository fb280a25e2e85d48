"""Weights on disk and on the Hugging Face Hub, and fetching every registered weight source.

A vitadapter folder (local, or a Hub model repo) holds ``config.json`` in timm's layout
(``architecture``, ``model_args`` with every constructor argument, ``pretrained_cfg``) and
``model.safetensors`` with vitadapter's own keys, so ``timm.create_model("hf-hub:...")`` reads it
too. Registered tags point at a timm Hub repo (ImageNet trunk) or an upstream release URL; both
are downloaded into a cache once and converted on load (conversion lives in ``upstream``).
"""
from __future__ import annotations

import http.client
import json
import os
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url
from huggingface_hub.utils import tqdm
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models import PretrainedCfg, get_pretrained_cfg, parse_model_name

from .models.vit_adapter import ViTAdapter, closest_architecture
from .staging import write_atomically
from .upstream import Conversion, load_checkpoint, read_checkpoint

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# pretrained_cfg entries config.json leaves out: where the weights came from (misleading once they sit
# in a new folder), and the architecture, which timm's layout keeps at the top level
_NOT_SAVED = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture")
# what a configuration built outside the registry inherits from its architecture's defaults
_PREPROCESSING_KEYS = (
    "input_size", "interpolation", "crop_pct", "mean", "std", "first_conv", "classifier", "pool_size", "num_classes",
)


def save_pretrained(
    model: ViTAdapter, folder: PathLike, pretrained_cfg: Optional[Mapping[str, Any]] = None
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``folder`` (created if needed).

    ``pretrained_cfg`` entries (e.g. ``mean``/``std``) override the model's own. Each file is written
    under a staging name and renamed (``vitadapter.staging``), so an interrupted save leaves no
    half-written file, and both get the usual umask-respecting mode.
    """
    if not isinstance(model, ViTAdapter):
        raise TypeError(f"save_pretrained expects a vitadapter ViTAdapter, got {type(model).__name__}")
    config = model_config(model, pretrained_cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors stores contiguous buffers only, and the model keeps its conv weights channels-last
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomically(folder / WEIGHTS_NAME, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    write_atomically(folder / CONFIG_NAME, lambda path: path.write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def model_config(model: ViTAdapter, pretrained_cfg: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The ``config.json`` content for ``model``: enough to rebuild its exact configuration."""
    own = getattr(model, "pretrained_cfg", None)
    if own and own.get("architecture"):
        architecture, cfg = own["architecture"], dict(own)
    else:
        # Built outside the registry (e.g. by load_upstream): model_args rebuild it through any
        # entrypoint; name the closest one and take only its preprocessing, not its provenance.
        architecture = closest_architecture(model.model_args)
        defaults = get_pretrained_cfg(architecture).to_dict()
        cfg = {k: defaults[k] for k in _PREPROCESSING_KEYS if k in defaults}
    cfg.update(pretrained_cfg or {})
    cfg = {k: v for k, v in cfg.items() if k not in _NOT_SAVED}
    try:
        PretrainedCfg(**cfg)
    except TypeError as e:
        raise ValueError(f"pretrained_cfg has a field timm's PretrainedCfg does not know: {e}") from e
    return {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": model.num_features,
        "model_args": model.model_args,
        "pretrained_cfg": cfg,
    }


def read_config(name: str, cache_dir: Optional[PathLike] = None) -> dict[str, Any]:
    """The ``config.json`` behind ``local-dir:FOLDER`` or ``hf-hub:org/name`` (Hub files are cached)."""
    source, location = parse_model_name(name)
    if source == "local-dir":
        path = Path(location) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{location} has no {CONFIG_NAME} (vitadapter.save_pretrained writes one)")
    else:
        path = _from_hub(location, CONFIG_NAME, cache_dir, name)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid config.json ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} should hold a JSON object, it holds a {type(config).__name__}")
    return config


def load_pretrained(
    model: ViTAdapter, pretrained_cfg: Mapping[str, Any], cache_dir: Optional[PathLike] = None
) -> Conversion:
    """Fetch the weights ``pretrained_cfg`` points at (file, folder, Hub repo or URL) and load them."""
    checkpoint = pretrained_cfg.get("state_dict") or read_weights(fetch_weights(pretrained_cfg, cache_dir))
    return load_checkpoint(model, checkpoint)


def fetch_weights(pretrained_cfg: Mapping[str, Any], cache_dir: Optional[PathLike] = None) -> Path:
    """A local path to the weights of ``pretrained_cfg``, downloading into the cache when needed.

    Precedence as in timm: an ``hf-hub`` source, a local file or folder, a Hub repo, a URL.
    """
    name = ".".join(filter(None, (pretrained_cfg.get("architecture"), pretrained_cfg.get("tag")))) or "this model"
    hub_id, file, url = pretrained_cfg.get("hf_hub_id"), pretrained_cfg.get("file"), pretrained_cfg.get("url")
    filename = pretrained_cfg.get("hf_hub_filename") or WEIGHTS_NAME
    if hub_id and pretrained_cfg.get("source") == "hf-hub":
        return _from_hub(hub_id, filename, cache_dir, name)
    if file:
        path = Path(file)
        path = path / WEIGHTS_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path} (given for {name})")
        return path
    if hub_id:
        return _from_hub(hub_id, filename, cache_dir, name)
    if url:
        return _from_url(url, cache_dir, name)
    raise ValueError(f"no pretrained weights are registered for {name}; pass pretrained_cfg_overlay=dict(file=PATH)")


def read_weights(path: PathLike) -> Any:
    """A weights file: safetensors, or a ``torch.save`` file / upstream ``.zip`` (``upstream.read_checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if not (path.suffix == ".safetensors" or _has_safetensors_header(path)):
        return read_checkpoint(path)
    try:
        return load_file(path)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"could not read {path}: the safetensors file is truncated or corrupt ({e})") from e


def push_to_hub(
    model_or_folder: Union[ViTAdapter, PathLike],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload vitadapter model",
) -> str:
    """Upload a ``save_pretrained`` folder (or a model, saved first) to Hub repo ``repo_id``, creating
    the repo if needed; returns the commit URL."""
    if isinstance(model_or_folder, torch.nn.Module):
        with tempfile.TemporaryDirectory() as folder:
            save_pretrained(model_or_folder, folder)
            return push_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message)
    folder = Path(model_or_folder)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: write it with vitadapter.save_pretrained")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return commit.commit_url


def _has_safetensors_header(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        start = f.read(9)
    return len(start) == 9 and start[8:] == b"{"


def _unavailable(name: str, where: str, error: Any) -> str:
    return (
        f"cannot fetch the weights of {name} from {where} ({error}). Without network access (or with "
        "HF_HUB_OFFLINE=1) and nothing cached, download that file on another machine and pass it: "
        "create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH))"
    )


def _from_hub(hub_id: str, filename: str, cache_dir: Optional[PathLike], name: str) -> Path:
    repo, _, revision = hub_id.partition("@")
    try:
        return Path(hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache_dir))
    except OSError as e:  # the Hub client's HTTP, offline and not-in-cache errors are all OSErrors
        raise FileNotFoundError(_unavailable(name, hf_hub_url(repo, filename, revision=revision or None), e)) from e


def _from_url(url: str, cache_dir: Optional[PathLike], name: str) -> Path:
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / Path(urllib.parse.urlparse(url).path).name
    if target.is_file():
        return target
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(_unavailable(name, url, f"offline mode, and no cached copy at {target}"))
    try:
        _download(url, target)
    except (OSError, http.client.HTTPException) as e:
        raise FileNotFoundError(_unavailable(name, url, e)) from e
    return target


def _download(url: str, target: Path) -> None:
    """Stream ``url`` into ``target`` through a temporary file: a failed or short download never
    lands in the cache (``Content-Length`` is checked, the connection may close early)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "vitadapter"})
    with urllib.request.urlopen(request, timeout=60) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length else None

        def write(path: Path) -> None:
            received = 0
            with open(path, "wb") as out, tqdm(total=expected, unit="B", unit_scale=True, desc=target.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and received != expected:
                raise ConnectionError(f"download incomplete: {received} of {expected} bytes")

        write_atomically(target, write)
