"""``vitadapter list`` and ``vitadapter describe``: the registered names and weight tags, and one model's
parameters, compute, preprocessing and weights, all read from ``catalog.json`` without torch."""
from __future__ import annotations

import argparse
import fnmatch
import sys
from typing import Any, Sequence

from .. import catalog
from ._common import UsageError, check_model_name, subcommand
from ._models import cached_weights, weights_source


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "list", "print the registered model names, or with --pretrained the weight tags")
    p.add_argument("pattern", nargs="?", default="", help="glob filter, e.g. 'vit_adapter_b*'")
    p.add_argument("--pretrained", action="store_true",
                   help="list arch.tag names that come with weights, marking each architecture's default and what is cached")
    p.set_defaults(run=list_names)

    p = subcommand(sub, "describe", "parameters, compute, preprocessing and weights of a model")
    p.add_argument("name", help="model name or name.tag, see `vitadapter list`")
    p.set_defaults(run=describe)


def list_names(args: argparse.Namespace) -> int:
    entries = catalog.load()
    if not args.pretrained:
        names = [name for name in entries["architectures"] if fnmatch.fnmatchcase(name, args.pattern or "*")]
        if names:
            print("\n".join(names))
    else:
        # as timm's list_pretrained: a pattern without a tag also matches every tag of the names
        patterns = [args.pattern or "*"] + ([f"{args.pattern}.*"] if args.pattern and "." not in args.pattern else [])
        names = [name for name in entries["weights"] if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        defaults = {f"{arch}.{entry['default_tag']}" for arch, entry in entries["architectures"].items() if entry["default_tag"]}
        width = max(map(len, names), default=0)
        for name in names:
            marks = ("default" if name in defaults else "", "cached" if cached_weights(entries["weights"][name]) else "")
            print(f"{name:<{width}}  {marks[0]:<7}  {marks[1]}".rstrip())
    if not names:
        command = "vitadapter list" + " --pretrained" * args.pretrained
        print(f"vitadapter: nothing matches {args.pattern!r}; `{command}` shows every name", file=sys.stderr)
        return 1
    return 0


def describe(args: argparse.Namespace) -> int:
    if ":" in args.name:
        raise UsageError(f"describe {args.name}: describe takes a registered name, see `vitadapter list`")
    check_model_name(args.name, "describe")
    entries = catalog.load()
    arch, _, tag = args.name.partition(".")
    entry = entries["architectures"][arch]
    if "requires" in entry:
        print(f"{args.name} is built from arguments, not a fixed configuration: {entry['requires']}")
        return 0
    name = f"{arch}.{tag or entry['default_tag']}"
    weights = entries["weights"][name]
    total, vit = entry["parameters"], entry["vit_parameters"]
    _, height, width = entry["input_size"]
    others = [n.partition(".")[2] for n in entries["weights"] if n.startswith(f"{arch}.") and n != name]
    print(args.name)
    if "num_classes" in entry:
        print(f"parameters:  {total:,} = {vit:,} ViT (model.backbone.vit) + adapter and heads; {entry['num_classes']} classes")
    else:
        print(f"parameters:  {total:,} = {vit:,} ViT (model.vit) + {total - vit:,} adapter")
    print(f"compute:     {entry['flops'] / 2e9:.1f} GMACs for one {width}x{height} image")
    print(f"input:       RGB in [0, 1], normalised with mean {_numbers(weights['mean'])} and std "
          f"{_numbers(weights['std'])}; default size {width}x{height}, any size >= 32x32 works")
    default = "  (the default tag)" if name == f"{arch}.{entry['default_tag']}" else ""
    print(f"weights:     {name}{default} from {weights_source(weights)}, {'cached' if cached_weights(weights) else 'not cached yet'}")
    if others:
        print(f"other tags:  {', '.join(others)}")
    print("levels (backbone.feature_info):" if "num_classes" in entry else "levels (feature_info):")
    for i, level in enumerate(entry["levels"]):
        print(f"  level {i + 1}: {level['channels']} channels, reduction {level['stride']}")
    return 0


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
