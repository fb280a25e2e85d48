"""Where a command's weights come from: whether the download cache holds them (without torch), their
source, and the model built with them, saying on stderr when it downloads."""
from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .. import catalog
from ._common import one_line

if TYPE_CHECKING:
    import torch


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` as a fresh process sees it, without importing torch."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def cached_weights(weights: dict[str, Any]) -> Optional[str]:
    """Where the download cache already holds these weights, if it does (nothing is fetched)."""
    if weights["hf_hub_id"]:
        from huggingface_hub import try_to_load_from_cache  # lazy: startup time

        repo, _, revision = weights["hf_hub_id"].partition("@")
        found = try_to_load_from_cache(repo, weights["hf_hub_filename"], revision=revision or None)
        return found if isinstance(found, str) else None
    path = torch_hub_dir() / "checkpoints" / Path(urllib.parse.urlparse(weights["url"]).path).name
    return str(path) if path.is_file() else None


def weights_source(weights: dict[str, Any]) -> str:
    """The address the catalog entry ``weights`` downloads from."""
    if weights["hf_hub_id"]:
        from huggingface_hub import constants  # lazy: startup time; its endpoint: HF_ENDPOINT or the Hub

        return f"{constants.ENDPOINT}/{weights['hf_hub_id']} ({weights['hf_hub_filename']})"
    return weights["url"]


def model_from_options(args: argparse.Namespace, device: "torch.device") -> tuple["torch.nn.Module", Optional[str]]:
    """The model of ``--model`` with ``--weights``, ``--pretrained`` or random weights (``--seed``), on
    ``device`` in eval mode, and where its weights came from (None: random)."""
    import torch  # lazy: startup time

    from .. import create_model

    torch.manual_seed(args.seed)
    if args.weights is not None:
        model = create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=args.weights))
        return model.eval().to(device), args.weights
    if not args.pretrained:
        return create_model(args.model).eval().to(device), None
    model, weights = pretrained_model(args.model)
    return model.eval().to(device), weights


def pretrained_model(name: str) -> tuple["torch.nn.Module", str]:
    """``create_model(name, pretrained=True)``, saying on stderr when it downloads, and where the weights
    came from. Weights that cannot be had raise an ``OSError`` that says how to get them."""
    from .. import create_model  # lazy: startup time (it loads torch and the models)

    download = _download_to_come(name)
    if download is None:
        model = create_model(name, pretrained=True)
    else:
        tag, source = download
        from huggingface_hub import constants  # lazy: startup time
        from huggingface_hub.utils import logging

        advice = f"download {source} on a machine with network access and pass the file with --weights FILE"
        if constants.HF_HUB_OFFLINE:
            raise OSError(f"the weights of {tag} are not cached and HF_HUB_OFFLINE is set: {advice}")
        print(f"fetching the weights of {tag} from {source}", file=sys.stderr)
        logging.set_verbosity_error()  # its retry notices; a failure ends in the one line below
        try:
            model = create_model(name, pretrained=True)
        except OSError as e:
            raise OSError(f"cannot fetch the weights of {tag} ({one_line(_root_cause(e))}): {advice}") from e
    cfg = model.pretrained_cfg
    tag_name = ".".join(filter(None, (cfg.get("architecture"), cfg.get("tag"))))
    return model, f"{tag_name or name} from {cfg.get('hf_hub_id') or cfg.get('url') or name}"


def _download_to_come(model: str) -> Optional[tuple[str, str]]:
    """(arch.tag, source) when ``model`` names registered weights that are not in the cache yet."""
    entries = catalog.load()
    arch, _, tag = model.partition(".")
    default = entries["architectures"].get(arch, {}).get("default_tag")
    if default is None:
        return None
    name = f"{arch}.{tag or default}"
    weights = entries["weights"].get(name)
    if weights is None or cached_weights(weights):
        return None
    return name, weights_source(weights)


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def released_or_random(name: str, fall_back: bool) -> tuple["torch.nn.Module", Optional[str]]:
    """``pretrained_model(name)``; where its weights cannot be had and ``fall_back``, random weights
    (seed 0) with a one-line notice on stderr, and None for where they came from."""
    try:
        return pretrained_model(name)
    except OSError as e:
        if not fall_back:
            raise
        import torch  # lazy: startup time

        from .. import create_model

        print(f"vitadapter: {one_line(e)}; running on random weights instead", file=sys.stderr)
        torch.manual_seed(0)
        return create_model(name), None
