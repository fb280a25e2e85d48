"""vitadapter folders: ``save_pretrained``, ``push_to_hub`` and reading a folder's ``config.json``.

A vitadapter folder (local, or a Hub model repo) holds ``config.json`` in timm's layout
(``architecture``, ``model_args`` with every constructor argument, ``pretrained_cfg``) and
``model.safetensors`` with vitadapter's own keys, so ``timm.create_model("hf-hub:...")`` reads it
too. A backbone's folder names its architecture (or the generic ``vit_adapter``); a segmentor's
names its registered segmentor, with the backbone's arguments, ``num_classes`` and the heads' own
(``head_channels``, ``num_queries``, ...) as ``model_args`` and its class names as ``label_names``;
a detector's likewise (``neck_channels``, ``box_fc_channels``, ...), with its normalisation. This module sits above the models (it describes them); fetching files is ``weights.fetch``'s.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, Optional, Union

import timm
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.models import PretrainedCfg, get_pretrained_cfg, parse_model_name
from timm.models._hub import _parse_model_cfg

from . import _json
from ._meta import meta_device
from .models import DETECTOR_MODULES, FAMILY_MODULES, SEGMENTOR_MODULES
from .models.config_checks import check_config_json
from .models.detector import Detector
from .models.segmentor import Segmentor
from .models.vit_adapter import ViTAdapter, closest_architecture
from .weights.download import bounded_hub_calls, download_limits
from .weights.fetch import WEIGHTS_NAME, hub_file
from .weights.staging import new_save_id, write_atomically

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
# what push_to_hub uploads from a folder: the format's files, nothing else that happens to be there
UPLOADED = (CONFIG_NAME, WEIGHTS_NAME)
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KiB; this is not one
# the key of the id of one save_pretrained call, in config.json and in the weights' metadata
SAVE_ID = "vitadapter_save"
# pretrained_cfg entries config.json leaves out: where the weights came from (misleading once they sit
# in a new folder), and the architecture, which timm's layout keeps at the top level
_NOT_SAVED = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture")
# what a configuration built outside the registry inherits from its architecture's defaults
_PREPROCESSING_KEYS = (
    "input_size", "interpolation", "crop_pct", "mean", "std", "first_conv", "classifier", "pool_size", "num_classes",
)


def save_pretrained(
    model: Union[ViTAdapter, Segmentor, Detector], folder: PathLike, pretrained_cfg: Optional[Mapping[str, Any]] = None
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``folder`` (created if needed).

    ``model``: a backbone, or a segmentor or detector built from the registry
    (``create_model("upernet_...")``, ``create_model("mask_rcnn_...")``, trained or not; one assembled
    otherwise is refused, see ``segmentor_config``).
    ``pretrained_cfg`` entries (e.g. ``mean``/``std``) override the model's own. Each file is written
    under a staging name and renamed (``vitadapter.weights.staging``), so an interrupted save leaves no
    half-written file, and both get the usual umask-respecting mode. Both files carry the id of
    this save (``SAVE_ID``), the weights written first: ``create_model("local-dir:...")`` checks
    that it built the model from one save even while another process re-saves the folder.
    """
    if isinstance(model, Segmentor):
        config = segmentor_config(model, pretrained_cfg)
    elif isinstance(model, Detector):
        config = detector_config(model, pretrained_cfg)
    elif isinstance(model, ViTAdapter):
        config = model_config(model, pretrained_cfg)
    else:
        raise TypeError(f"save_pretrained expects a vitadapter ViTAdapter, Segmentor or Detector, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors stores contiguous buffers only, and the model keeps its conv weights channels-last
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_id = new_save_id()
    config[SAVE_ID] = save_id
    metadata = {"format": "pt", SAVE_ID: save_id}
    write_atomically(folder / WEIGHTS_NAME, lambda path: save_file(tensors, str(path), metadata=metadata))
    write_atomically(folder / CONFIG_NAME, lambda path: path.write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def saved_together(folder: PathLike, config: Mapping[str, Any]) -> bool:
    """Whether ``config`` (read from ``folder`` before a model was built from it), the folder's
    config.json now and its weights now all come from one save. As saves never reuse an id and
    write the weights before the config, the same id before and after means every read in between
    saw that save's files. Files without a save id (written by other tools, by hand, or by an
    earlier vitadapter) cannot be told apart and pass."""
    before = config.get(SAVE_ID)
    if before is None:
        return True
    folder = Path(folder)
    try:
        after = json.loads((folder / CONFIG_NAME).read_text()).get(SAVE_ID)
        with safe_open(folder / WEIGHTS_NAME, "pt") as weights:
            saved = (weights.metadata() or {}).get(SAVE_ID)
    except (OSError, ValueError, AttributeError, SafetensorError):  # replaced by something else meanwhile
        return False
    return before == after and saved in (None, before)


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
    return _task_config(segmentor, pretrained_cfg, "segmentor", "create_model('upernet_...'), create_model('mask2former_...')",
                        "load_upstream_segmentor", "load_segmentor_checkpoint")


def detector_config(detector: Detector, pretrained_cfg: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The ``config.json`` content for a registered detector: its architecture, the arguments it was
    built with (``detector.model_args``: the backbone's, ``num_classes`` and the heads' widths), its
    class names and the normalisation it runs with. Refused as ``segmentor_config`` refuses."""
    # the normalisation the detector runs with, which may have been set after it was built
    own = dict(mean=list(detector.mean), std=list(detector.std), **(pretrained_cfg or {}))
    return _task_config(detector, own, "detector", "create_model('mask_rcnn_...'), create_model('cascade_mask_rcnn_...')",
                        "load_upstream_detector", "load_detector_checkpoint")


def _task_config(
    model: Union[Segmentor, Detector], pretrained_cfg: Optional[Mapping[str, Any]], kind: str, registry: str, assembler: str,
    loader: str,
) -> dict[str, Any]:
    """A registered task model's ``config.json`` content (``kind``: "segmentor" or "detector", built
    through ``registry``, assembled otherwise by ``assembler``, loaded into by ``loader``)."""
    own = getattr(model, "pretrained_cfg", None) or {}
    architecture, model_args = own.get("architecture"), model.model_args
    if not architecture or model_args is None:
        raise ValueError(
            f"save_pretrained writes {kind}s built from the registry ({registry}); this one was assembled otherwise "
            f"(e.g. by {assembler}), so no registered architecture rebuilds it. Build the architecture it matches and "
            f"load its checkpoint: {loader}(create_model(NAME, num_classes=..., ...), checkpoint), "
            "or `vitadapter convert CHECKPOINT DST --arch NAME`"
        )
    _check_rebuilds(model, kind, architecture, model_args)
    cfg = dict(own, num_classes=model.num_classes)
    cfg.pop("label_descriptions", None)  # they describe the tag's classes, which may no longer be these
    cfg["label_names"] = list(model.class_names) if model.class_names is not None else None
    return {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "model_args": model_args,
        "pretrained_cfg": _saved_cfg(cfg, pretrained_cfg),
    }


def _check_rebuilds(model: torch.nn.Module, kind: str, architecture: str, model_args: Mapping[str, Any]) -> None:
    """Build ``architecture`` from ``model_args`` without memory (meta tensors) and compare its state
    dict, key by key and shape by shape, with ``model``'s."""
    with torch.device("meta"):
        rebuilt = timm.create_model(architecture, **model_args).state_dict()
    own = model.state_dict()
    differ = sorted(set(own) ^ set(rebuilt)) or [k for k in own if own[k].shape != rebuilt[k].shape]
    if differ:
        shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise ValueError(
            f"this {kind} no longer matches {architecture} built with its model_args (its modules were "
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


def read_config(
    name: str, cache_dir: Optional[PathLike] = None, timeout: Optional[float] = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``config.json`` behind ``local-dir:FOLDER`` or ``hf-hub:org/name`` (Hub files are cached;
    ``timeout``: seconds for the download, see ``vitadapter.weights.download``), and where its weights are:
    the folder, or the Hub repo at the commit this config.json came from (``hf_hub_id`` "org/name@COMMIT"),
    so that the weights and the config are of one version."""
    source, location = parse_model_name(name)
    if source == "local-dir":
        path = Path(location) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{location} has no {CONFIG_NAME} (vitadapter.save_pretrained writes one)")
        origin = {"file": location, "source": "local-dir"}
    else:
        path = hub_file(location, CONFIG_NAME, cache_dir, f"{CONFIG_NAME} of {name}", timeout)
        # the cache keeps every file at snapshots/COMMIT/FILE
        origin = {"hf_hub_id": f"{location.partition('@')[0]}@{path.parent.name}", "source": "hf-hub"}
    return _parse_json(path.read_bytes(), path), origin


def check_config(config: Mapping[str, Any], label: str) -> str:
    """Check a folder's ``config.json`` content (``label`` names it in errors) before anything is built:
    a registered vitadapter architecture with valid arguments. Returns the architecture."""
    architecture = config.get("architecture")
    known = sorted({n for module in FAMILY_MODULES for n in timm.list_models(module=module)})
    if not isinstance(architecture, str) or architecture not in known:
        raise ValueError(f"{label} describes a {architecture!r} model, not a vitadapter architecture ({', '.join(known)})")
    check_config_json(config, label, task=architecture_task(architecture))
    return architecture


def architecture_task(architecture: str) -> Optional[str]:
    """"segmentation" or "detection" for a registered task model's architecture, None for a backbone."""
    for task, modules in (("segmentation", SEGMENTOR_MODULES), ("detection", DETECTOR_MODULES)):
        if architecture in {n for module in modules for n in timm.list_models(module=module)}:
            return task
    return None


def create_from_config(
    config: Mapping[str, Any], origin: Mapping[str, Any], pretrained: bool = False, **kwargs: Any
) -> torch.nn.Module:
    """Build the model ``config`` (checked with ``check_config``) describes, its weights from ``origin``
    (``read_config``'s), with ``kwargs`` over its arguments: what ``timm.create_model("hf-hub:...")``
    does, from this very dict rather than from a second read of the file."""
    pretrained_cfg, architecture, model_args = _parse_model_cfg(copy.deepcopy(dict(config)), dict(origin))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return timm.create_model(
        architecture, pretrained=pretrained, pretrained_cfg=pretrained_cfg, pretrained_model_args=dict(model_args),
        **{**model_args, **kwargs},
    )


def _parse_json(data: bytes, path: Path) -> dict[str, Any]:
    try:
        config = _json.loads(data.decode(), str(path))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a valid config.json ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} should hold a JSON object, it holds a {type(config).__name__}")
    return config


def push_to_hub(
    model_or_folder: Union[ViTAdapter, Segmentor, Detector, PathLike],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload vitadapter model",
    timeout: Optional[float] = None,
) -> str:
    """Upload a ``save_pretrained`` folder (or a model, saved first) to Hub repo ``repo_id``, creating
    the repo if needed; returns the commit URL.

    Only the format's files go (``UPLOADED``: config.json and model.safetensors; nothing else in the
    folder), each a regular file opened without following a symlink, and only once the folder is
    checked to load (``check_upload``). The upload runs under the download limits: ``timeout``
    seconds overall ($VITADAPTER_DOWNLOAD_TIMEOUT) and the minimum-progress rule
    ($VITADAPTER_DOWNLOAD_STALL), see ``vitadapter.weights.download``.
    """
    if isinstance(model_or_folder, torch.nn.Module):
        with tempfile.TemporaryDirectory() as folder:
            save_pretrained(model_or_folder, folder)
            return push_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message, timeout=timeout)
    limits = download_limits(timeout)
    with _checked_upload(Path(model_or_folder)) as (config, weights):
        # file objects, not paths: what is sent is what was opened and checked (huggingface_hub
        # sends them over HTTP, under the limits, where a path would go to hf_xet, outside them)
        operations = [CommitOperationAdd(CONFIG_NAME, config), CommitOperationAdd(WEIGHTS_NAME, weights)]
        api = HfApi(token=token)
        with bounded_hub_calls(f"upload to {repo_id}", limits), _no_fallback_notice():
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.create_commit(repo_id, operations, commit_message=commit_message)
    return commit.commit_url


def check_upload(folder: PathLike) -> list[tuple[str, int]]:
    """The files ``push_to_hub(folder, ...)`` uploads, with their sizes in bytes, once the folder is
    checked to load: config.json names a registered architecture with valid arguments, and the
    weights' header holds the keys and shapes of that model (built on the meta device, no memory).
    Raises ``FileNotFoundError``/``ValueError`` naming what is wrong."""
    with _checked_upload(Path(folder)) as (config, weights):
        return [(CONFIG_NAME, len(config)), (WEIGHTS_NAME, os.fstat(weights.fileno()).st_size)]


@contextmanager
def _checked_upload(folder: Path) -> Iterator[tuple[bytes, BinaryIO]]:
    """(config.json's bytes, model.safetensors opened) from ``folder``, checked as ``check_upload`` says."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: push_to_hub uploads one written by vitadapter.save_pretrained")
    with _open_regular(folder / CONFIG_NAME) as f:
        config = f.read(MAX_CONFIG_BYTES + 1)
    if len(config) > MAX_CONFIG_BYTES:
        raise ValueError(f"{folder / CONFIG_NAME} is over {MAX_CONFIG_BYTES} bytes: not a vitadapter config.json")
    parsed = _parse_json(config, folder / CONFIG_NAME)
    architecture = check_config(parsed, str(folder / CONFIG_NAME))
    model_args = parsed.get("model_args") or {}
    with meta_device():
        expected = {k: tuple(v.shape) for k, v in timm.create_model(architecture, **model_args).state_dict().items()}
    with _open_regular(folder / WEIGHTS_NAME) as weights:
        found = _safetensors_shapes(folder / WEIGHTS_NAME, weights)
        differ = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        if differ:
            shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
            raise ValueError(
                f"{folder / WEIGHTS_NAME} does not load into the {architecture} its {CONFIG_NAME} describes: "
                f"{shown} differ (missing, unexpected or of another shape)"
            )
        yield config, weights


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file and not a symlink (refused, by name, otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: write the folder with vitadapter.save_pretrained") from None
    except OSError as e:
        if path.is_symlink():
            raise ValueError(f"{path} is a symlink: push_to_hub uploads regular files only, never what a link points at") from e
        raise
    f = os.fdopen(fd, "rb")
    if path.is_symlink() or not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ValueError(f"{path} is not a regular file: push_to_hub uploads regular files only, never through a symlink")
    return f


def _safetensors_shapes(path: Path, opened: BinaryIO) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the safetensors file ``opened`` (at ``path``), read by safetensors from
    the path after checking that the path still names the opened file."""
    own = os.fstat(opened.fileno())
    try:
        with safe_open(path, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{path} is not a whole safetensors file ({e})") from e
    now = os.stat(path, follow_symlinks=False)
    if (now.st_dev, now.st_ino) != (own.st_dev, own.st_ino):
        raise ValueError(f"{path} was replaced while it was being checked; push again")
    return shapes


@contextmanager
def _no_fallback_notice() -> Iterator[None]:
    """Silence huggingface_hub's warning that file objects go over HTTP rather than hf_xet: it is meant."""
    logger = logging.getLogger("huggingface_hub._commit_api")

    def drop(record: logging.LogRecord) -> bool:
        return "not supported by Xet Storage" not in record.getMessage()

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
