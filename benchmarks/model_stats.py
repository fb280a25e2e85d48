"""Parameter counts and GMACs (at 512x512, batch 1) of every registered architecture.

GMACs = FLOPs / 2 from torch's FlopCounterMode under the math SDPA backend (attention counted).
The model is built on the meta device for counting parameters, so L costs no memory.

    python benchmarks/model_stats.py [--resolution 512]
"""
from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitadapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    print("| arch | parameters | ViT part | adapter | GMACs @ %d |" % args.resolution)
    print("|---|---|---|---|---|")
    for name in vitadapter.list_models():
        model = vitadapter.create_model(name).eval()
        total = sum(p.numel() for p in model.parameters())
        vit = sum(p.numel() for p in model.vit.parameters())
        image = torch.randn(1, 3, args.resolution, args.resolution)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(image)
        print(f"| {name} | {total:,} | {vit:,} | {total - vit:,} | {counter.get_total_flops() / 2e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
