"""``vitadapter push``: upload a folder of config.json + model.safetensors (from convert or
save_pretrained), once checked to load, to a Hub model repo."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import subcommand


def add_commands(sub: Any) -> None:
    p = subcommand(sub, "push", "upload a folder of config.json + model.safetensors (convert, save_pretrained) to a Hub model repo")
    p.add_argument("folder", help="the folder; only its config.json and model.safetensors are uploaded, once checked to load")
    p.add_argument("repo", help="Hub model repo, org/name (created if needed; the token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    p.set_defaults(run=push)


def push(args: argparse.Namespace) -> int:
    from .. import hub  # lazy: startup time

    folder = Path(args.folder)
    files = hub.check_upload(folder)
    print(f"uploading to {args.repo}:")
    for name, size in files:
        print(f"  {folder / name} ({size:,} bytes)")
    others = sorted(p.name for p in folder.iterdir() if p.name not in hub.UPLOADED)
    if others:
        print(f"  not uploaded (not part of the format): {', '.join(others)}")
    url = hub.push_to_hub(folder, args.repo, private=True if args.private else None)
    print(f"committed {url}")
    return 0
