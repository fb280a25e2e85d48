"""The ``vitadapter`` command: list and describe models, picture the feature pyramid of an image (or a
folder of them), segment images, measure a segmentor's mIoU, detect objects, measure a detector's
COCO AP, fine-tune a segmentor, convert upstream checkpoints into Hub folders and export models to ONNX.

One module per command, each with ``add_commands(subparsers)`` and the function its subcommand runs;
what they share is in ``_common`` (options, checks, error text), ``_images``, ``_models``,
``_segmentors`` and ``_detectors``. Only the commands that run models import torch, inside their
functions: ``--help``, ``list``, ``describe`` and usage errors answer at once, from ``catalog.json``. Every error is one
line on stderr; ``--debug`` (or ``VITADAPTER_DEBUG=1``) shows its traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .. import __version__
from . import convert, detect, eval_det, eval_seg, export_onnx, features, listing, push, segment, train_det, train_seg
from ._common import DEBUG_ENV, add_debug, one_line

# Errors whose message says all a user needs (a bad file, name, option, no network); other types
# are bugs and say so.
_USER_ERRORS = (OSError, ValueError, TypeError, KeyError)
# the order of `vitadapter --help`
_COMMANDS = (listing, features, segment, eval_seg, detect, eval_det, convert, train_seg, train_det, push, export_onnx)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per job."""
    parser = argparse.ArgumentParser(prog="vitadapter", description="ViT-Adapter feature pyramids, segmentation and detection on timm ViTs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_debug(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``vitadapter`` script; returns the exit code (2 on an error)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader of stdout left (`vitadapter list | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("vitadapter: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, _USER_ERRORS):
            print(f"vitadapter: error: {one_line(err)}", file=sys.stderr)
        else:
            print(f"vitadapter: error: {type(err).__name__}: {one_line(err)} "
                  f"(a bug: --debug shows the traceback to report)", file=sys.stderr)
        return 2
