"""Weights on disk and on the Hugging Face Hub, and fetching every registered weight source.

A vitadapter folder (local, or a Hub model repo) holds ``config.json`` in timm's layout
(``architecture``, ``model_args`` with every constructor argument, ``pretrained_cfg``) and
``model.safetensors`` with vitadapter's own keys, so ``timm.create_model("hf-hub:...")`` reads it
too. A backbone's folder names its architecture (or the generic ``vit_adapter``); a segmentor's
names its registered segmentor, with the backbone's arguments, ``num_classes`` and the heads' own
(``head_channels``, ``num_queries``, ...) as ``model_args`` and its class names as ``label_names``. Registered tags point at a timm Hub repo (ImageNet trunk) or an upstream release URL; both
are downloaded into a cache once and converted on load (conversion lives in ``upstream``).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from huggingface_hub import HfApi, constants, hf_hub_url, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models import PretrainedCfg, get_pretrained_cfg, parse_model_name

from . import _json
from .models.segmentor import Segmentor
from .models.vit_adapter import ViTAdapter, closest_architecture
from .download import DownloadError, Limits, Transfer, download_limits, open_url
from .staging import remove_stale, write_atomically
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
    model: Union[ViTAdapter, Segmentor], folder: PathLike, pretrained_cfg: Optional[Mapping[str, Any]] = None
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``folder`` (created if needed).

    ``model``: a backbone, or a segmentor built from the registry (``create_model("upernet_...")``,
    trained or not; one assembled otherwise is refused, see ``segmentor_config``).
    ``pretrained_cfg`` entries (e.g. ``mean``/``std``) override the model's own. Each file is written
    under a staging name and renamed (``vitadapter.staging``), so an interrupted save leaves no
    half-written file, and both get the usual umask-respecting mode.
    """
    if isinstance(model, Segmentor):
        config = segmentor_config(model, pretrained_cfg)
    elif isinstance(model, ViTAdapter):
        config = model_config(model, pretrained_cfg)
    else:
        raise TypeError(f"save_pretrained expects a vitadapter ViTAdapter or Segmentor, got {type(model).__name__}")
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
    return {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": model.num_features,
        "model_args": model.model_args,
        "pretrained_cfg": _saved_cfg(cfg, pretrained_cfg),
    }


def segmentor_config(segmentor: Segmentor, pretrained_cfg: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The ``config.json`` content for a registered segmentor: its architecture, the arguments it was
    built with (``segmentor.model_args``) and its class names.

    A segmentor assembled outside the registry (``load_upstream_segmentor``, or ``Segmentor(...)``)
    has no architecture to name, and one whose modules were replaced after it was built would not
    come back from its arguments: both are refused (``ValueError``), naming what differs.
    """
    own = getattr(segmentor, "pretrained_cfg", None) or {}
    architecture, model_args = own.get("architecture"), segmentor.model_args
    if not architecture or model_args is None:
        raise ValueError(
            "save_pretrained writes segmentors built from the registry (create_model('upernet_...'), "
            "create_model('mask2former_...')); this one was assembled otherwise (e.g. by load_upstream_segmentor), "
            "so no registered architecture rebuilds it. Build the architecture it matches and load its checkpoint: "
            "load_segmentor_checkpoint(create_model(NAME, num_classes=..., ...), checkpoint), "
            "or `vitadapter convert CHECKPOINT DST --arch NAME`"
        )
    _check_rebuilds(segmentor, architecture, model_args)
    cfg = dict(own, num_classes=segmentor.num_classes)
    cfg.pop("label_descriptions", None)  # they describe the tag's classes, which may no longer be these
    cfg["label_names"] = list(segmentor.class_names) if segmentor.class_names is not None else None
    return {
        "architecture": architecture,
        "num_classes": segmentor.num_classes,
        "model_args": model_args,
        "pretrained_cfg": _saved_cfg(cfg, pretrained_cfg),
    }


def _check_rebuilds(segmentor: Segmentor, architecture: str, model_args: Mapping[str, Any]) -> None:
    """Build ``architecture`` from ``model_args`` without memory (meta tensors) and compare its state
    dict, key by key and shape by shape, with ``segmentor``'s."""
    import timm

    with torch.device("meta"):
        rebuilt = timm.create_model(architecture, **model_args).state_dict()
    own = segmentor.state_dict()
    differ = sorted(set(own) ^ set(rebuilt)) or [k for k in own if own[k].shape != rebuilt[k].shape]
    if differ:
        shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise ValueError(
            f"this segmentor no longer matches {architecture} built with its model_args (its modules were "
            f"changed after it was built): {shown} differ, so a saved folder would not load back"
        )


def _saved_cfg(cfg: dict[str, Any], overrides: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``cfg`` with ``overrides``, less what config.json leaves out, checked against timm's fields."""
    cfg = dict(cfg, **(overrides or {}))
    cfg = {k: v for k, v in cfg.items() if k not in _NOT_SAVED}
    try:
        PretrainedCfg(**cfg)
    except TypeError as e:
        raise ValueError(f"pretrained_cfg has a field timm's PretrainedCfg does not know: {e}") from e
    return cfg


def read_config(name: str, cache_dir: Optional[PathLike] = None, timeout: Optional[float] = None) -> dict[str, Any]:
    """The ``config.json`` behind ``local-dir:FOLDER`` or ``hf-hub:org/name`` (Hub files are cached;
    ``timeout``: seconds for the download, see ``vitadapter.download``)."""
    source, location = parse_model_name(name)
    if source == "local-dir":
        path = Path(location) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{location} has no {CONFIG_NAME} (vitadapter.save_pretrained writes one)")
    else:
        path = _from_hub(location, CONFIG_NAME, cache_dir, name, timeout)
    try:
        config = _json.loads(path.read_text(), str(path))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a valid config.json ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} should hold a JSON object, it holds a {type(config).__name__}")
    return config


def load_pretrained(
    model: ViTAdapter,
    pretrained_cfg: Mapping[str, Any],
    cache_dir: Optional[PathLike] = None,
    timeout: Optional[float] = None,
) -> Conversion:
    """Fetch the weights ``pretrained_cfg`` points at (file, folder, Hub repo or URL) and load them."""
    checkpoint = pretrained_cfg.get("state_dict") or read_weights(fetch_weights(pretrained_cfg, cache_dir, timeout))
    return load_checkpoint(model, checkpoint)


def fetch_weights(
    pretrained_cfg: Mapping[str, Any], cache_dir: Optional[PathLike] = None, timeout: Optional[float] = None
) -> Path:
    """A local path to the weights of ``pretrained_cfg``, downloading into the cache when needed.

    Precedence as in timm: an ``hf-hub`` source, a local file or folder, a Hub repo, a URL. Downloads
    run under ``timeout`` seconds overall and a minimum-progress rule (``vitadapter.download``).
    """
    name = ".".join(filter(None, (pretrained_cfg.get("architecture"), pretrained_cfg.get("tag")))) or "this model"
    hub_id, file, url = pretrained_cfg.get("hf_hub_id"), pretrained_cfg.get("file"), pretrained_cfg.get("url")
    filename = pretrained_cfg.get("hf_hub_filename") or WEIGHTS_NAME
    if hub_id and pretrained_cfg.get("source") == "hf-hub":
        return _from_hub(hub_id, filename, cache_dir, name, timeout)
    if file:
        path = Path(file)
        path = path / WEIGHTS_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path} (given for {name})")
        return path
    if hub_id:
        return _from_hub(hub_id, filename, cache_dir, name, timeout)
    if url:
        return _from_url(url, cache_dir, name, timeout)
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
    model_or_folder: Union[ViTAdapter, Segmentor, PathLike],
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


def _from_hub(hub_id: str, filename: str, cache_dir: Optional[PathLike], name: str, timeout: Optional[float]) -> Path:
    """A Hub file, kept in huggingface_hub's cache layout (so the Hub client, timm and
    ``HF_HUB_OFFLINE=1`` find it) but fetched by vitadapter's bounded download: ``hf_hub_download``
    retries for minutes against a server that accepts connections and never answers."""
    repo, _, revision = hub_id.partition("@")
    revision = revision or constants.DEFAULT_REVISION
    _check_repo_path(filename, "file name")
    _check_repo_path(revision, "revision")
    url = hf_hub_url(repo, filename, revision=revision)
    limits = download_limits(timeout)
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    if constants.HF_HUB_OFFLINE:
        cached = _hub_cached(repo, filename, revision, cache)
        if cached is None:
            raise FileNotFoundError(_unavailable(name, url, "offline mode, and no cached copy"))
        return cached
    try:
        return _hub_download(url, repo, filename, revision, cache, limits)
    except (OSError, http.client.HTTPException) as e:
        # as huggingface_hub does, a Hub that cannot be reached falls back on the cached copy
        cached = _hub_cached(repo, filename, revision, cache)
        if cached is None:
            raise FileNotFoundError(_unavailable(name, url, e)) from e
        return cached


def _hub_download(url: str, repo: str, filename: str, revision: str, cache: Path, limits: Limits) -> Path:
    """Download into the cache as huggingface_hub lays it out: ``blobs/ETAG``, a relative symlink to it
    at ``snapshots/COMMIT/FILE`` and ``refs/REVISION`` holding the commit."""
    storage = cache / repo_folder_name(repo_id=repo, repo_type="model")
    headers = build_hf_headers()
    token = {k: headers.pop(k) for k in list(headers) if k.lower() == "authorization"}
    with open_url(url, limits, headers=headers, private_headers=token) as transfer:
        commit, etag = _hub_version(transfer)
        pointer = storage / "snapshots" / commit / filename
        if not pointer.is_file():
            blob = storage / "blobs" / etag
            if not blob.is_file():
                transfer.save(blob)
            _link(blob, pointer)
    if revision != commit:
        ref = storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(ref, lambda path: path.write_text(commit))
    return pointer


def _hub_version(transfer: Transfer) -> tuple[str, str]:
    """(commit, blob id) of a Hub file, from the Hub's own response: for large files, the redirect to
    the storage host, whose ``X-Linked-Etag`` names the blob."""
    for headers in reversed(transfer.hops):
        commit = headers.get(constants.HUGGINGFACE_HEADER_X_REPO_COMMIT)
        if commit:
            etag = headers.get(constants.HUGGINGFACE_HEADER_X_LINKED_ETAG) or headers.get("ETag") or ""
            etag = etag.removeprefix("W/").strip('"')
            break
    else:
        raise DownloadError(f"{transfer.url} answered without the Hub's X-Repo-Commit header: is HF_ENDPOINT a Hub?")
    # both become file names in the cache: nothing but a commit hash and a plain blob id is accepted
    if not re.fullmatch(r"[0-9a-f]{40}", commit) or not re.fullmatch(r"[0-9A-Za-z_-]{1,128}", etag):
        raise DownloadError(f"{transfer.url} answered with an unexpected commit {commit!r} or ETag {etag!r}")
    return commit, etag


def _link(blob: Path, pointer: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except FileExistsError:  # another process linked it first
        pass
    except OSError:  # no symlinks here (Windows without developer mode): a copy, as huggingface_hub makes
        write_atomically(pointer, lambda path: shutil.copyfile(blob, path))


def _hub_cached(repo: str, filename: str, revision: str, cache: Path) -> Optional[Path]:
    cached = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def _check_repo_path(value: str, what: str) -> None:
    """A file name or revision from a config must stay inside the repo's cache folder."""
    parts = value.replace("\\", "/").split("/")
    if not value or value.startswith("/") or ".." in parts:
        raise ValueError(f"Hub {what} {value!r} must be a relative path inside the repository")


def _from_url(url: str, cache_dir: Optional[PathLike], name: str, timeout: Optional[float]) -> Path:
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    filename = Path(urllib.parse.urlparse(url).path).name
    if filename in ("", ".", ".."):
        raise ValueError(f"the weights URL {url!r} does not end in a file name")
    target = folder / filename
    limits = download_limits(timeout)
    remove_stale(folder)
    if target.is_file():
        return target
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(_unavailable(name, url, f"offline mode, and no cached copy at {target}"))
    try:
        with open_url(url, limits) as transfer:
            transfer.save(target)
    except (OSError, http.client.HTTPException) as e:
        raise FileNotFoundError(_unavailable(name, url, e)) from e
    return target
