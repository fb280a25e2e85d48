"""Peak memory of one CPU training step with the trunk frozen vs trained (``freeze_trunk``).

Each configuration runs in a fresh process: build the model (random weights), one warm-up step, then
one measured forward + backward at batch 1; the figure is the process's peak resident memory (max RSS)
during the measured step minus its resident memory before it, in MiB. fp32, 2 threads.

    python benchmarks/frozen_memory.py [--size 512] [--arch vit_adapter_dinov3_s vit_adapter_dinov2_s]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

_STEP = r"""
import json, resource, sys, torch, vitadapter
torch.set_num_threads(2)
arch, freeze, size = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
model = vitadapter.create_model(arch, freeze_trunk=freeze).train()
image = torch.randn(1, 3, size, size)
def step():
    loss = sum(level.square().mean() for level in model(image))
    loss.backward()
    model.zero_grad(set_to_none=True)
step()
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
# clearing the kernel's high-water mark makes the peak below the measured step's alone
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
step()
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
print(json.dumps({"before": before, "peak": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--arch", nargs="+", default=["vit_adapter_dinov3_s", "vit_adapter_dinov2_s"])
    args = parser.parse_args()
    print(f"| arch | trunk | peak extra MiB (step, {args.size}x{args.size}, batch 1) |")
    print("|---|---|---|")
    for arch in args.arch:
        for freeze in (False, True):
            out = subprocess.run([sys.executable, "-c", _STEP, arch, str(int(freeze)), str(args.size)],
                                 check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"| {arch} | {'frozen' if freeze else 'trained'} | {result['peak'] - result['before']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
