"""Fetching weight files: Hub repos, release URLs and local paths, into caches, under time limits.

Hub files are kept in huggingface_hub's cache layout (so the Hub client, timm and
``HF_HUB_OFFLINE=1`` find them) but fetched by vitadapter's bounded download (``download``):
``hf_hub_download`` retries for minutes against a server that accepts connections and never answers.
Release URLs go to torch.hub's checkpoint folder. What enters a cache has the length and hash its
server announced. This module knows no model class.
"""
from __future__ import annotations

import http.client
import os
import re
import shutil
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from huggingface_hub import constants, hf_hub_url, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers
from huggingface_hub.utils.sha import git_hash, sha_fileobj
from safetensors import SafetensorError, safe_open

from .download import DownloadError, Limits, Transfer, download_limits, open_url
from .staging import remove_stale, write_atomically

PathLike = Union[str, os.PathLike]

# the weights file of a vitadapter folder (local or a Hub repo)
WEIGHTS_NAME = "model.safetensors"

MAX_GIT_FILE = 50 << 20  # the Hub keeps files over 10 MB in LFS (sha256 ETags); git's hash reads it whole

def fetch_weights(
    pretrained_cfg: Mapping[str, Any], cache_dir: Optional[PathLike] = None, timeout: Optional[float] = None
) -> Path:
    """A local path to the weights of ``pretrained_cfg``, downloading into the cache when needed.

    Precedence as in timm: an ``hf-hub`` source, a local file or folder, a Hub repo, a URL. Downloads
    run under ``timeout`` seconds overall and a minimum-progress rule (``vitadapter.weights.download``).
    """
    name = ".".join(filter(None, (pretrained_cfg.get("architecture"), pretrained_cfg.get("tag")))) or "this model"
    hub_id, file, url = pretrained_cfg.get("hf_hub_id"), pretrained_cfg.get("file"), pretrained_cfg.get("url")
    filename = pretrained_cfg.get("hf_hub_filename") or WEIGHTS_NAME
    if hub_id and pretrained_cfg.get("source") == "hf-hub":
        # a Hub folder's config keeps the tag it was saved from: the repo is what failed
        return hub_file(hub_id, filename, cache_dir, f"the weights of hf-hub:{hub_id}", timeout)
    if file:
        path = Path(file)
        path = path / WEIGHTS_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path} (given for {name})")
        return path
    if hub_id:
        return hub_file(hub_id, filename, cache_dir, f"the weights of {name}", timeout)
    if url:
        return _from_url(url, cache_dir, f"the weights of {name}", timeout)
    raise ValueError(f"no pretrained weights are registered for {name}; pass pretrained_cfg_overlay=dict(file=PATH)")



def _unavailable(what: str, where: str, error: Any) -> str:
    return (
        f"cannot fetch {what} from {where} ({error}). Without network access (or with "
        "HF_HUB_OFFLINE=1) and nothing cached, download that file on another machine and pass it: "
        "create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH))"
    )


def hub_file(hub_id: str, filename: str, cache_dir: Optional[PathLike], what: str, timeout: Optional[float]) -> Path:
    """A Hub file, kept in huggingface_hub's cache layout (so the Hub client, timm and
    ``HF_HUB_OFFLINE=1`` find it) but fetched by vitadapter's bounded download: ``hf_hub_download``
    retries for minutes against a server that accepts connections and never answers. ``what``
    ("the weights of hf-hub:org/name") names the file in errors."""
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
            raise FileNotFoundError(_unavailable(what, f"Hub repo {repo} ({url})", "offline mode, and no cached copy"))
        return cached
    try:
        return _hub_download(url, repo, filename, revision, cache, limits)
    except (OSError, http.client.HTTPException) as e:
        # as huggingface_hub does, a Hub that cannot be reached (or sends a broken file) falls back on
        # the cached copy, if there is a whole one
        cached = _hub_cached(repo, filename, revision, cache)
        if cached is None or not _looks_whole(cached, None, filename.endswith(".safetensors")):
            raise FileNotFoundError(_unavailable(what, f"Hub repo {repo} ({url})", e)) from e
        return cached


def _hub_download(url: str, repo: str, filename: str, revision: str, cache: Path, limits: Limits) -> Path:
    """Download into the cache as huggingface_hub lays it out: ``blobs/ETAG``, a relative symlink to it
    at ``snapshots/COMMIT/FILE`` and ``refs/REVISION`` holding the commit.

    What enters the cache has the length and the hash (the ETag: sha256 for large files, git's sha1
    for others) the Hub announced; a cached copy that does not look whole (another length than the
    Hub's, or a safetensors file whose header does not cover it, as a cut download or a captive
    portal's page left by another tool) is downloaded again instead of being kept."""
    storage = cache / repo_folder_name(repo_id=repo, repo_type="model")
    headers = build_hf_headers()
    token = {k: headers.pop(k) for k in list(headers) if k.lower() == "authorization"}
    with open_url(url, limits, headers=headers, private_headers=token) as transfer:
        commit, etag, size = _hub_version(transfer)
        pointer = storage / "snapshots" / commit / filename
        blob = storage / "blobs" / etag
        safetensors = filename.endswith(".safetensors")
        if not _looks_whole(pointer, size, safetensors):
            if not _looks_whole(blob, size, safetensors):
                transfer.save(blob, check=lambda path: _check_blob(path, etag, size, url))
            if pointer.is_symlink() or pointer.exists():
                pointer.unlink()  # a broken copy, or a link to another blob
            _link(blob, pointer)
    if revision != commit:
        ref = storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(ref, lambda path: path.write_text(commit))
    return pointer


def _hub_version(transfer: Transfer) -> tuple[str, str, Optional[int]]:
    """(commit, blob id, size if announced) of a Hub file, from the Hub's own response: for large files,
    the redirect to the storage host, whose ``X-Linked-Etag`` and ``X-Linked-Size`` describe the blob."""
    for headers in reversed(transfer.hops):
        commit = headers.get(constants.HUGGINGFACE_HEADER_X_REPO_COMMIT)
        if commit:
            etag = headers.get(constants.HUGGINGFACE_HEADER_X_LINKED_ETAG) or headers.get("ETag") or ""
            etag = etag.removeprefix("W/").strip('"')
            size = headers.get(constants.HUGGINGFACE_HEADER_X_LINKED_SIZE) or transfer.hops[-1].get("Content-Length")
            break
    else:
        raise DownloadError(f"{transfer.url} answered without the Hub's X-Repo-Commit header: is HF_ENDPOINT a Hub?")
    # both become file names in the cache: nothing but a commit hash and a plain blob id is accepted
    if not re.fullmatch(r"[0-9a-f]{40}", commit) or not re.fullmatch(r"[0-9A-Za-z_-]{1,128}", etag):
        raise DownloadError(f"{transfer.url} answered with an unexpected commit {commit!r} or ETag {etag!r}")
    return commit, etag, int(size) if size and size.isdigit() else None


def _check_blob(path: Path, etag: str, size: Optional[int], url: str) -> None:
    """Refuse a downloaded file whose length or hash is not the one the Hub announced."""
    length = path.stat().st_size
    if size is not None and length != size:
        raise DownloadError(f"{url} sent {length} bytes where the Hub announced {size}: not cached")
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        with open(path, "rb") as f:
            digest = sha_fileobj(f).hex()
    elif re.fullmatch(r"[0-9a-f]{40}", etag) and length <= MAX_GIT_FILE:
        digest = git_hash(path.read_bytes())
    else:
        return
    if digest != etag:
        raise DownloadError(f"{url} sent a file whose hash {digest} is not its ETag {etag} (a proxy's page, or a cut file): not cached")


def _looks_whole(path: Path, size: Optional[int], safetensors: bool) -> bool:
    """Whether a cached file is there and, as far as a cheap look tells, whole: the announced length,
    and for ``safetensors`` a header that parses and covers the file."""
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    if not safetensors:
        return True
    try:
        with safe_open(path, "pt"):
            return True
    except (SafetensorError, OSError, ValueError):
        return False


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


def _from_url(url: str, cache_dir: Optional[PathLike], what: str, timeout: Optional[float]) -> Path:
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
        raise FileNotFoundError(_unavailable(what, url, f"offline mode, and no cached copy at {target}"))
    try:
        with open_url(url, limits) as transfer:
            transfer.save(target)
    except (OSError, http.client.HTTPException) as e:
        raise FileNotFoundError(_unavailable(what, url, e)) from e
    return target
