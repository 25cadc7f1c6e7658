#!/usr/bin/env python
"""Where a training step spends its time: torch.profiler over steps of ATSS + 6 DyHead blocks and of the
ATSS baseline, built and fed exactly as benchmarks/train_step.py does (random weights, one fixed batch
of the profile's size; default the coco profile: ResNet-50, 800x1333, the per-GPU batch of 2).

After `--warmup` untimed steps, `--steps` steps run under the profiler. Per model it reports
  * kernels: the top `--top` device kernels by their own device time (CUDA), or the top operators by
    their own CPU time (`--device cpu`), as name, calls, total ms over the profiled steps, ms per step
    and share of the device (CPU) time of all of them;
  * operators: the top operators by device time including what they launch (CUDA only; these nest,
    e.g. aten::conv2d contains aten::convolution, so their shares do not add up), which attributes the
    GEMMs and sampling kernels of the deformable conv to dyhead::deform_conv2d(_backward).
Written as JSON (`--json`) and markdown (`--md`); the markdown is also printed.

    python benchmarks/profile_step.py --device cuda --dtype bfloat16 --json prof.json --md prof.md
    python benchmarks/profile_step.py --device cpu --profile tiny --steps 1 --warmup 0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step  # noqa: E402  (benchmarks/train_step.py: the same models and batch)

from dyhead.config import resolve  # noqa: E402
from dyhead.files import save_json, save_text  # noqa: E402
from dyhead.ops import native, resolve_backend  # noqa: E402

DEFAULT_EXPERIMENTS = ["atss-r50-dyh6-LSC-1x", "atss-r50-base-1x"]
NAME_WIDTH = 110  # markdown cells; JSON keeps whole names


def _self_device_us(e) -> float:
    return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)


def _device_us(e) -> float:
    return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0) or 0.0)


def _is_device_event(e) -> bool:
    dt = getattr(e, "device_type", None)
    return dt is not None and dt != torch.autograd.DeviceType.CPU


def summarise(events, device: torch.device, steps: int, top: int) -> dict:
    """Top kernels (and, on CUDA, operators) of the profiled steps from prof.key_averages()."""
    events = list(events)
    if device.type == "cuda":
        kernels = [e for e in events if _is_device_event(e) and _self_device_us(e) > 0]
        if not kernels:  # profilers that put kernels on CPU-typed rows: take whatever has own device time
            kernels = [e for e in events if _self_device_us(e) > 0]
        own = _self_device_us
    else:
        kernels = [e for e in events if e.self_cpu_time_total > 0]
        own = lambda e: float(e.self_cpu_time_total)  # noqa: E731
    total_us = sum(own(e) for e in kernels)
    rows = []
    for e in sorted(kernels, key=own, reverse=True)[:top]:
        rows.append({"name": e.key, "calls": int(e.count), "total_ms": own(e) / 1e3,
                     "ms_per_step": own(e) / 1e3 / steps, "share": own(e) / total_us if total_us else 0.0})
    out = {"time_kind": "device kernel time" if device.type == "cuda" else "self CPU time of operators",
           "total_ms": total_us / 1e3, "ms_per_step": total_us / 1e3 / steps, "kernels": rows}
    if device.type == "cuda":
        ops = [e for e in events if not _is_device_event(e) and _device_us(e) > 0]
        out["operators"] = [
            {"name": e.key, "calls": int(e.count), "total_ms": _device_us(e) / 1e3,
             "ms_per_step": _device_us(e) / 1e3 / steps, "share": _device_us(e) / total_us if total_us else 0.0}
            for e in sorted(ops, key=_device_us, reverse=True)[:top]
        ]
    return out


def profile_model(exp: str, args, device: torch.device, batch: int) -> dict:
    step = train_step.build_step(exp, args.profile, resolve_backend(args.backend), device, batch, args.boxes,
                                 args.num_classes, args.dtype)
    for _ in range(args.warmup):
        step()
    train_step.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            losses = step()
        train_step.sync(device)
    finite = all(bool(torch.isfinite(v.detach().float()).all()) for v in losses.values())
    if not finite:
        raise RuntimeError(f"{exp}: non-finite loss under the profiler")
    return {"experiment": exp, **summarise(prof.key_averages(), device, args.steps, args.top)}


def _cell(name: str) -> str:
    name = name.replace("|", "\\|").replace("\n", " ")
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 1] + "…"


def markdown(report: dict) -> str:
    lines = [f"# Top kernels of a training step ({report['device_name']}, {report['dtype']}, profile "
             f"{report['profile']}, batch {report['batch']}, {report.get('threads', '?')} CPU thread(s), "
             f"dcn backend {report['backend']}, "
             f"{report['steps']} profiled steps after {report['warmup']} warm-up; torch {report['torch']})", ""]
    for m in report["models"]:
        lines += [f"## {m['experiment']}: {m['ms_per_step']:.2f} ms of {m['time_kind']} per step", "",
                  "| kernel | calls | total ms | ms / step | share |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(r['name'])} | {r['calls']} | {r['total_ms']:.2f} | {r['ms_per_step']:.3f} | "
                  f"{100 * r['share']:.1f}% |" for r in m["kernels"]]
        if m.get("operators"):
            lines += ["", "Operators by device time including what they launch (nested: shares overlap):", "",
                      "| operator | calls | total ms | ms / step | share |", "|---|---|---|---|---|"]
            lines += [f"| {_cell(r['name'])} | {r['calls']} | {r['total_ms']:.2f} | {r['ms_per_step']:.3f} | "
                      f"{100 * r['share']:.1f}% |" for r in m["operators"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="*", help=f"experiment ids (default: {' '.join(DEFAULT_EXPERIMENTS)})")
    p.add_argument("--profile", default="coco", help="profile whose model and image size are used (default coco)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=train_step.DTYPES, default="float32",
                   help="float32 (default), or autocast to bfloat16 / float16")
    p.add_argument("--backend", default="native", choices=("native", "torchvision"),
                   help="deformable conv backend (default native)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the profile's per-GPU batch)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per model (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    p.add_argument("--boxes", type=int, default=7, help="random boxes per image (default 7)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; mini's trainings run one per job)")
    p.add_argument("--json", type=Path, default=None, help="write the tables as JSON here")
    p.add_argument("--md", type=Path, default=None, help="write the tables as markdown here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0 or args.top < 1 or (args.threads is not None and args.threads < 1):
        print("error: --steps, --top and --threads must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.backend == "native" and (not native.is_built() or (device.type == "cuda" and not native.cuda_compiled())):
        print(f"error: native extension unavailable for {device.type} ({native.status()}); "
              "run `dyhead build-ext` (with --cuda on for a GPU) or pass --backend torchvision", file=sys.stderr)
        return 2
    exps = args.experiments or DEFAULT_EXPERIMENTS
    batch = args.batch or train_step.per_gpu_batch(resolve(exps[0], args.profile).profile)
    report = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "profile": args.profile, "dtype": args.dtype, "backend": args.backend,
              "batch": batch, "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
              "models": []}
    for exp in exps:
        report["models"].append(profile_model(exp, args, device, batch))
        print(f"  profiled {exp}", file=sys.stderr, flush=True)
    text = markdown(report)
    print(text)
    if args.json:
        save_json(args.json, report)
    if args.md:
        save_text(args.md, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
