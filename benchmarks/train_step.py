#!/usr/bin/env python
"""Time one training step (forward, losses, backward, SGD update) of each detector at a profile's size.

For every experiment asked for (default: Table 3's rows plus ATSS), under one profile (default
`coco`: ResNet-50, 256-channel FPN and head, 800x1333 images), the detector is built exactly as
`dyhead train` builds it, but with random weights (no ImageNet file is needed), and trained on one
fixed batch of random images with random boxes, with the native deformable conv and with
torchvision's in the same process. It reports per backend the median seconds per step, images per
second and the peak memory of a step, and the ratio torchvision / native measured in this run.

The batch is the profile's per-GPU batch (coco: 16 images over 8 GPUs = 2). `--dtype` runs the
forward (and so the losses) under torch.autocast in bfloat16 or float16 (float16 with a GradScaler);
the default float32 is how the trainer runs today. Boxes are random, so the numbers are the cost of
the network and the loss code at that size, not of a particular image.

    python benchmarks/train_step.py --device cuda                       # coco profile, Table 3 rows
    python benchmarks/train_step.py --device cuda --dtype bfloat16
    python benchmarks/train_step.py --profile tiny --device cpu --steps 1 --warmup 0 atss-r50-base-1x
    python benchmarks/train_step.py --profile mini --device cpu --threads 1 --backends native --compile \
        atss-r50-dyh6-LSC-1x                                            # torch.compile of the blocks on the CPU
"""
from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dyhead.config import load_matrix, resolve  # noqa: E402
from dyhead.engine.runtime import PRECISIONS, resolve_precision  # noqa: E402
from dyhead.files import save_json  # noqa: E402
from dyhead.modeling.build import build_detector  # noqa: E402
from dyhead.modeling.dyhead import DyHeadBlock  # noqa: E402
from dyhead.ops import native, resolve_backend  # noqa: E402

DEFAULT_EXPERIMENTS = ["atss-r50-base-1x", "atss-r50-dyh6-LSC-1x"]  # followed by Table 3's other rows
DTYPES = ("float32", "bfloat16", "float16")


def default_experiments() -> list[str]:
    exps = list(DEFAULT_EXPERIMENTS)
    for e in load_matrix().table_experiments("table3"):
        if e not in exps:
            exps.append(e)
    return exps


def baseline_of(exp: str) -> str | None:
    """The baseline-head experiment of a DyHead one (same detector, backbone, schedule), by the id rule."""
    base = re.sub(r"-dyh\d+-[A-Za-z]*-", "-base-", exp)
    return base if base != exp else None


def make_batch(n: int, height: int, width: int, num_classes: int, boxes: int, device, seed: int = 0):
    """Random images in [0, 1] and `boxes` random boxes per image (4 to 50% of the side)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, height, width, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        wh = torch.rand(boxes, 2, generator=g) * 0.46 + 0.04
        xy = torch.rand(boxes, 2, generator=g) * (1 - wh)
        b = torch.cat([xy, xy + wh], dim=1) * torch.tensor([width, height, width, height])
        targets.append({"boxes": b, "labels": torch.randint(0, num_classes, (boxes,), generator=g)})
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images, targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_gpu_batch(profile: dict) -> int:
    """The profile's batch per process: batch_size over 8 GPUs for CUDA profiles, all of it on CPU."""
    return max(1, profile["solver"]["batch_size"] // (8 if profile["runtime"]["device"] == "cuda" else 1))


def apply_settings(run, settings: dict) -> None:
    """Dotted profile keys set in place on `run.profile` ({"runtime.memory_format": "channels_last"}); a new leaf
    is allowed (settings with defaults may be absent), a missing section is a one-line exit."""
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = run.profile
        for k in parents:
            if not isinstance(node, dict) or k not in node:
                raise SystemExit(f"--set {key}: profile {run.profile_name} has no {k!r} there")
            node = node[k]
        node[leaf] = value


def build_step(exp: str, profile: str, backend: str, device: torch.device, batch: int | None, boxes: int,
               num_classes: int, dtype: str | None = "float32", compile_blocks: bool = False,
               settings: dict | None = None) -> Callable[[], dict]:
    """One experiment's detector (random weights, built as `dyhead train` builds it), SGD and a fixed
    batch; returns step(), which runs forward, losses, backward and the update and returns the losses
    as tensors (not synchronised). Mixed precision: autocast around the forward, a GradScaler for fp16.
    `compile_blocks`: torch.compile each DyHead block, as `runtime.compile: blocks` does in training;
    `settings`: dotted profile keys to override (apply_settings), e.g. {"runtime.memory_format": "channels_last"}.
    `batch` None: the profile's per-GPU batch; `dtype` None: the profile's runtime.precision (both after `settings`,
    so `solver.batch_size` and `runtime.precision` can be compared like any other setting)."""
    run = resolve(exp, profile)
    apply_settings(run, settings or {})
    if batch is None:
        batch = per_gpu_batch(run.profile)
    if dtype is None:
        name = resolve_precision(run.profile["runtime"].get("precision", "fp32"), device)
        if name not in PRECISIONS:
            raise SystemExit(f"runtime.precision: {name!r} is not one of {', '.join(PRECISIONS)}")
        dtype = str(PRECISIONS[name] or torch.float32).removeprefix("torch.")  # the trainer's map, as a DTYPES name
    torch.manual_seed(0)
    model = build_detector(run, num_classes, backend, load_weights=False).to(device).train()
    if compile_blocks:
        for block in (m for m in model.modules() if isinstance(m, DyHeadBlock)):
            block.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    solver = run.profile["solver"]
    # a small lr: random weights on random boxes must stay finite over the timed steps
    opt = torch.optim.SGD(params, lr=solver["base_lr"] * 0.01, momentum=solver["momentum"],
                          weight_decay=solver["weight_decay"])
    inp = run.profile["input"]
    images, targets = make_batch(batch, inp["min_size_train"] if isinstance(inp["min_size_train"], int)
                                 else max(inp["min_size_train"]), inp["max_size"], num_classes, boxes, device)
    amp = dtype != "float32"
    scaler = torch.amp.GradScaler(device.type) if dtype == "float16" else None

    def step() -> dict:
        ctx = torch.autocast(device.type, dtype=getattr(torch, dtype)) if amp else contextlib.nullcontext()
        with ctx:
            losses = model(images, targets)
            total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
        else:
            total.backward()
            opt.step()
        return losses

    # for callers that report what they timed (setting_pair: the layout, the batch and the dtype)
    step.model, step.batch, step.dtype = model, batch, dtype
    return step


def time_steps(exp: str, profile: str, backend: str, device: torch.device, batch: int, steps: int, warmup: int,
               boxes: int, num_classes: int, dtype: str = "float32", compile_blocks: bool = False,
               memory_format: str | None = None) -> dict:
    settings = {"runtime.memory_format": memory_format} if memory_format is not None else None
    step = build_step(exp, profile, backend, device, batch, boxes, num_classes, dtype, compile_blocks, settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, last, first = [], {}, None
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        losses = step()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0  # with --compile: tracing and compiling the blocks
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        last = {k: float(v.detach()) for k, v in losses.items()}
    if not all(torch.isfinite(torch.tensor(list(last.values())))):
        raise RuntimeError(f"{exp} [{backend}, {dtype}]: non-finite loss {last}")
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"experiment": exp, "backend": backend, "dtype": dtype, "compiled": compile_blocks,
            "memory_format": memory_format, "sec_per_step": sec,
            "images_per_sec": batch / sec, "first_step_sec": first, "peak_gib": peak, "steps": steps, "losses": last}


def dyhead_over_baseline(results: list[dict], exps: list[str], backends: list[str]) -> list[dict]:
    """Step time of each DyHead experiment over its baseline's, per backend, both measured in this run."""
    sec = {(r["experiment"], r["backend"]): r["sec_per_step"] for r in results}
    out = []
    for exp in exps:
        base = baseline_of(exp)
        if base is None or base not in exps:
            continue
        row = {"experiment": exp, "baseline": base}
        for b in backends:
            if (exp, b) in sec and (base, b) in sec:
                row[b] = sec[(exp, b)] / sec[(base, b)]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="*", help="experiment ids (default: ATSS and Table 3's rows)")
    p.add_argument("--profile", default="coco", help="profile whose model and image size are used (default coco)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--batch", type=int, default=None,
                   help="images per step (default: the profile's per-GPU batch, batch_size / 8 for cuda profiles)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and backend (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--boxes", type=int, default=7, help="random boxes per image (COCO averages ~7; default 7)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--backends", default="native,torchvision", help="comma list (default native,torchvision)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="float32 (default, as the trainer runs), or autocast to bfloat16 / float16 (with a GradScaler)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; mini's trainings run one per job)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each DyHead block (runtime.compile: blocks); the first step, which compiles, "
                        "is reported apart")
    p.add_argument("--memory-format", choices=("contiguous", "channels_last"), default=None,
                   help="layout of weights and feature maps (default: the profile's runtime.memory_format)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    backends = args.backends.split(",")
    for b in backends:
        if b not in ("native", "torchvision"):
            print(f"error: --backends: unknown backend {b!r}; expected native or torchvision", file=sys.stderr)
            return 2
    if "native" in backends:
        if not native.is_built() or (device.type == "cuda" and not native.cuda_compiled()):
            print(f"error: native extension unavailable for {device.type} ({native.status()}); "
                  "run `dyhead build-ext` (with --cuda on for a GPU)", file=sys.stderr)
            return 2
    exps = args.experiments or default_experiments()
    prof = resolve(exps[0], args.profile).profile
    batch = args.batch or per_gpu_batch(prof)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, device {device} ({name}), profile {args.profile}, batch {batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.dtype}"
          f"{' (autocast)' if args.dtype != 'float32' else ''}{', DyHead blocks compiled' if args.compile else ''}"
          f"{', ' + args.memory_format if args.memory_format else ''}, "
          "random weights and boxes", flush=True)
    results, errors = [], []
    for exp in exps:
        for b in backends:
            try:
                r = time_steps(exp, args.profile, resolve_backend(b), device, batch, args.steps, args.warmup,
                               args.boxes, args.num_classes, args.dtype, args.compile, args.memory_format)
            except Exception as e:  # noqa: BLE001 - report it and go on with the other models and backends
                errors.append({"experiment": exp, "backend": b, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
                print(f"  {exp:40s} {b:12s} failed: {errors[-1]['error'][:200]}", flush=True)
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(r)
            peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a"
            print(f"  {exp:40s} {b:12s} {r['sec_per_step'] * 1000:9.1f} ms/step {r['images_per_sec']:7.2f} img/s "
                  f"peak {peak}; first step {r['first_step_sec']:.1f} s", flush=True)
    print("\n| experiment | native ms/step | torchvision ms/step | torchvision / native | native peak GiB | torchvision peak GiB |")
    print("|---|---|---|---|---|---|")
    for exp in exps:
        got = {r["backend"]: r for r in results if r["experiment"] == exp}
        nat, tv = got.get("native"), got.get("torchvision")
        cell = lambda r, k, f: (f % (r[k] * (1000 if k == "sec_per_step" else 1))) if r and r[k] is not None else "–"  # noqa: E731
        ratio = f"{tv['sec_per_step'] / nat['sec_per_step']:.2f}x" if nat and tv else "–"
        print(f"| {exp} | {cell(nat, 'sec_per_step', '%.1f')} | {cell(tv, 'sec_per_step', '%.1f')} | {ratio} | "
              f"{cell(nat, 'peak_gib', '%.2f')} | {cell(tv, 'peak_gib', '%.2f')} |")
    ratios = dyhead_over_baseline(results, exps, backends)
    if ratios:
        print(f"\n| DyHead experiment ({args.dtype}) | baseline | " + " | ".join(f"{b}: DyHead / baseline" for b in backends)
              + " |")
        print("|---|---|" + "---|" * len(backends))
        for r in ratios:
            print(f"| {r['experiment']} | {r['baseline']} | "
                  + " | ".join(f"{r[b]:.2f}x" if r.get(b) else "–" for b in backends) + " |")
    if args.json:
        save_json(args.json, {"device": name, "torch": torch.__version__, "profile": args.profile, "batch": batch,
                              "dtype": args.dtype, "compiled": args.compile, "memory_format": args.memory_format, "results": results, "dyhead_over_baseline": ratios,
                              "errors": errors})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
