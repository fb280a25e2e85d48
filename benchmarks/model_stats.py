"""Parameter counts and GMACs (at 512x512, batch 1) of every registered architecture.

GMACs = FLOPs / 2 counted as ``vitadapter describe`` counts them at the default size
(``vitadapter.catalog.flops_without_memory``): torch's FlopCounterMode under the math SDPA backend,
attention counted, the model built on the meta device and run on fake tensors, so even the 7B trunk
costs no memory. The deformable-attention op has no FLOP formula and is not counted (it is a few
percent).

    python benchmarks/model_stats.py [--resolution 512] [--pattern 'beit*']
"""
from __future__ import annotations

import argparse

import torch

import vitadapter
from vitadapter.catalog import flops_without_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--pattern", default="", help="glob over architecture names")
    args = parser.parse_args()
    print("| arch | parameters | ViT part | adapter | GMACs @ %d |" % args.resolution)
    print("|---|---|---|---|---|")
    for name in vitadapter.list_models(args.pattern):
        if name == "vit_adapter":  # no trunk of its own
            continue
        with torch.device("meta"):
            model = vitadapter.create_model(name).eval()
        total = sum(p.numel() for p in model.parameters())
        vit = sum(p.numel() for p in model.vit.parameters())
        gmacs = flops_without_memory(model, (3, args.resolution, args.resolution)) / 2e9
        print(f"| {name} | {total:,} | {vit:,} | {total - vit:,} | {gmacs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
