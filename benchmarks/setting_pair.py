#!/usr/bin/env python
"""A profile setting against the profile as it is: one training step of each, in one process, turn by turn.

step_pair.py compares revisions, so each side needs its own process; on a shared virtual machine two processes
started seconds apart can run 20% apart in speed, more than a setting may change. Here both models live in one
process and alternate step by step, so a drift of the machine falls on both alike. Per experiment: the median
step of the profile as it is and with every `--set` applied, and their ratio (above 1: the setting is faster).
Both models are built as `dyhead train` builds them (random weights, the same seed) and train on random
batches of the profile's size, each side with its own settings: `solver.batch_size` changes the batch (compare the
ms per image then), `runtime.precision` the autocast dtype. The layout, batch and dtype each side ran in are reported.

    python benchmarks/setting_pair.py --set runtime.memory_format=channels_last
    python benchmarks/setting_pair.py --set runtime.precision=bf16
    python benchmarks/setting_pair.py --set solver.batch_size=16     # per image: does a larger batch amortise?
    python benchmarks/setting_pair.py --set model.backbones.r50.freeze_at=2 --set runtime.memory_format=channels_last \
        --steps 40 atss-r50-dyh6-LSC-1x --json pair.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dyhead.config import resolve  # noqa: E402
from dyhead.ops import resolve_backend  # noqa: E402
from step_pair import DEFAULT_EXPERIMENTS, parse_settings  # noqa: E402
from train_step import build_step  # noqa: E402

SIDES = ("as is", "with")


def layout_of(model: torch.nn.Module) -> str:
    """The layout the model holds its conv weights in."""
    conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)
    nhwc = not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    return "channels_last" if nhwc else "contiguous"


def pair(exp: str, args, settings: dict) -> dict:
    run = resolve(exp, args.profile)
    classes = run.profile["data"].get("synthetic", {}).get("num_classes", 80)
    size = dict(profile=args.profile, backend=resolve_backend(run.profile["runtime"]["dcn_backend"]),
                device=torch.device("cpu"), batch=None, boxes=4, num_classes=classes, dtype=None)
    steps = {"as is": build_step(exp, **size), "with": build_step(exp, **size, settings=settings)}
    for _ in range(args.warmup):
        for side in SIDES:
            steps[side]()
    times = {side: [] for side in SIDES}
    for _ in range(args.steps):
        for side in SIDES:
            t0 = time.perf_counter()
            steps[side]()
            times[side].append(time.perf_counter() - t0)
    plain, changed = statistics.median(times["as is"]), statistics.median(times["with"])
    a, w = steps["as is"], steps["with"]
    per_image = (plain / a.batch) / (changed / w.batch)
    return {"experiment": exp, "as_is_sec_per_step": plain, "with_sec_per_step": changed, "as_is_over_with": plain / changed,
            "as_is_over_with_per_image": per_image,
            # per image, so a pair with another batch size counts what it saves per image
            "faster_steps": sum(x / a.batch > y / w.batch for x, y in zip(times["as is"], times["with"])),
            "steps": args.steps,
            "as_is_layout": layout_of(a.model), "with_layout": layout_of(w.model), "as_is_batch": a.batch,
            "with_batch": w.batch, "as_is_dtype": a.dtype, "with_dtype": w.dtype}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="*", help=f"experiment ids (default: {' '.join(DEFAULT_EXPERIMENTS)})")
    p.add_argument("--set", action="append", required=True, metavar="KEY=VALUE",
                   help="a profile setting for the second model (repeatable), e.g. runtime.memory_format=channels_last")
    p.add_argument("--profile", default="mini", help="profile whose model, batch and image size are used (default mini)")
    p.add_argument("--steps", type=int, default=30, help="timed steps of each model, alternating (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each first (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as mini's trainings)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.threads < 1 or args.warmup < 0:
        p.error("--steps and --threads must be at least 1, --warmup at least 0")
    settings = parse_settings(args.set)
    torch.set_num_threads(args.threads)
    print(f"# {args.profile}: {args.steps} alternating steps each (after {args.warmup}), {args.threads} thread(s); "
          f"with {', '.join(args.set)}", flush=True)
    rows = []
    for exp in args.experiments or DEFAULT_EXPERIMENTS:
        rows.append(pair(exp, args, settings))
        r = rows[-1]
        print(f"  {exp:32s} as is {r['as_is_sec_per_step'] * 1000:7.1f} ms/step, with {r['with_sec_per_step'] * 1000:7.1f} "
              f"({r['with_layout']}, batch {r['with_batch']}, {r['with_dtype']}); the setting faster per image in "
              f"{r['faster_steps']} of {r['steps']} step pairs", flush=True)
    print("\n| experiment | as is ms/step | with the setting ms/step | as is / with | per image |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['experiment']} | {r['as_is_sec_per_step'] * 1000:.1f} (batch {r['as_is_batch']}) | "
              f"{r['with_sec_per_step'] * 1000:.1f} (batch {r['with_batch']}) | {r['as_is_over_with']:.2f}x | "
              f"{r['as_is_over_with_per_image']:.2f}x |")
    if args.json:
        from dyhead.files import save_json

        save_json(args.json, {"profile": args.profile, "steps": args.steps, "warmup": args.warmup,
                              "threads": args.threads, "settings": settings, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
