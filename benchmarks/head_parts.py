#!/usr/bin/env python
"""Where a stack of DyHead blocks spends its training time: the block with each attention switched off, timed in
one process on the same pyramid, steps alternating.

Variants (forward + backward of the stack on random maps of the profile's pyramid):
    full        scale (pi_L), spatial (pi_S: deformable convs fed by an offset conv) and task (pi_C: DyReLU)
    no_spatial  plain 3x3 convs in place of the deformable ones, no offset conv
    no_scale    without pi_L
    no_task     ReLU in place of DyReLU
    none        all three off: the skeleton of 13 convs, GroupNorms, resamplings and branch means per level
The differences to `full` are what each part costs; `none` is what any head with this wiring pays.

    python benchmarks/head_parts.py                          # mini: 6 blocks, 32 channels, batch 8, P3-P7 16..1 px
    python benchmarks/head_parts.py --channels 256 --sizes 100,50,25,13,7 --batch 2 --steps 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dyhead.modeling.dyhead import DyHead, DyHeadConfig  # noqa: E402
from dyhead.ops import resolve_backend  # noqa: E402

VARIANTS = {"full": {}, "no_spatial": {"spatial": False}, "no_scale": {"scale": False}, "no_task": {"task": False},
            "none": {"spatial": False, "scale": False, "task": False}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=6, help="blocks in the stack (default 6)")
    p.add_argument("--channels", type=int, default=32, help="channels (default 32, mini's fpn_channels)")
    p.add_argument("--gn-groups", type=int, default=16, help="GroupNorm groups (default 16, mini's)")
    p.add_argument("--sizes", default="16,8,4,2,1", help="square side of each level, finest first (default mini's)")
    p.add_argument("--batch", type=int, default=8, help="images (default 8, mini's batch)")
    p.add_argument("--steps", type=int, default=12, help="timed steps of each variant, alternating (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as mini's trainings)")
    p.add_argument("--dcn-backend", default="auto", help="auto, native or torchvision (default auto)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: expected comma-separated integers, e.g. 16,8,4,2,1")
    if min(args.blocks, args.channels, args.batch, args.steps, args.threads, *sizes) < 1:
        p.error("--blocks, --channels, --batch, --steps, --threads and every size must be at least 1")
    torch.set_num_threads(args.threads)
    backend = resolve_backend(args.dcn_backend)
    heads = {}
    for name, switches in VARIANTS.items():
        torch.manual_seed(0)
        heads[name] = DyHead(DyHeadConfig(blocks=args.blocks, channels=args.channels, gn_groups=args.gn_groups,
                                          dcn_backend=backend, **switches))
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(args.batch, args.channels, s, s, generator=g, requires_grad=True) for s in sizes]
    times = {name: [] for name in heads}
    for i in range(args.warmup + args.steps):
        for name, head in heads.items():
            t0 = time.perf_counter()
            sum(o.sum() for o in head(features)).backward()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    print(f"# {args.blocks} blocks, {args.channels} channels, batch {args.batch}, levels {args.sizes} px, "
          f"{args.threads} thread(s), deformable conv {backend}; forward + backward, median of {args.steps}")
    print("| variant | ms | full − variant |")
    print("|---|---|---|")
    for name in heads:
        print(f"| {name} | {ms[name]:.1f} | {ms['full'] - ms[name]:+.1f} |")
    if args.json:
        from dyhead.files import save_json

        save_json(args.json, {"blocks": args.blocks, "channels": args.channels, "batch": args.batch, "sizes": sizes,
                              "threads": args.threads, "dcn_backend": backend, "steps": args.steps, "ms": ms,
                              "all_seconds": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
