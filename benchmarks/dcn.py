#!/usr/bin/env python
"""Benchmark the native DCNv2 op against torchvision's and against a plain conv2d (the floor).

For every shape it times, in the same process and back to back, the forward (with autograd
recording, as in training), the backward alone and forward+backward of

    native       dyhead.ops.native.deform_conv2d      (the extension; `dyhead build-ext`)
    torchvision  torchvision.ops.deform_conv2d
    conv         torch.nn.functional.conv2d of the same input, weight, stride and padding

and reports medians, the ratios torchvision/native and native/conv, and the peak memory of one
forward+backward step above what the inputs already hold:
    CPU : every tensor allocation and free seen by torch's CPU allocator during the step, from
          torch.profiler(profile_memory=True); the peak of their running sum. Both ops allocate their
          work buffers as ATen tensors, so this is the CPU analogue of max_memory_allocated.
    CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().

Shapes (3x3 kernels, padding 1, offsets ~ N(0, 1), mask = sigmoid(N(0, 1))):
    mini : batch 8, 32 channels, levels 16, 8, 4, 2, 1 at stride 1, and the stride-2 branch
           16->8, 8->4, 4->2, 2->1 (DyHead's "low" input from the finer level)
    ref  : batch 8, 64 channels, 40x40, stride 1 (the issue's reference shape)
    coco : batch 2, 256 channels, P3 100x168 and P4 50x84, stride 1 and 2 (opt-in on CPU: --coco)

    .venv/bin/python benchmarks/dcn.py                 # CPU, mini + ref, a few minutes at most
    .venv/bin/python benchmarks/dcn.py --coco --reps 3
    .venv/bin/python benchmarks/dcn.py --device cuda --dtype float16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dyhead.ops import native  # noqa: E402

BACKENDS = ("native", "torchvision", "conv")


@dataclass(frozen=True)
class Shape:
    name: str
    group: str
    n: int
    c: int
    h: int
    w: int
    stride: int

    @property
    def out_hw(self) -> tuple[int, int]:
        return (self.h - 1) // self.stride + 1, (self.w - 1) // self.stride + 1


def shapes(groups: list[str]) -> list[Shape]:
    out: list[Shape] = []
    if "mini" in groups:
        for s in (16, 8, 4, 2, 1):
            out.append(Shape(f"mini {s}x{s} s1", "mini", 8, 32, s, s, 1))
        for s in (16, 8, 4, 2):
            out.append(Shape(f"mini {s}x{s}->{s // 2} s2", "mini", 8, 32, s, s, 2))
    if "ref" in groups:
        out.append(Shape("ref 8x64 40x40 s1", "ref", 8, 64, 40, 40, 1))
    if "coco" in groups:
        for (h, w), lvl in (((100, 168), "P3"), ((50, 84), "P4")):
            for s in (1, 2):
                out.append(Shape(f"coco {lvl} {h}x{w} s{s}", "coco", 2, 256, h, w, s))
    return out


@dataclass
class Result:
    shape: str
    group: str
    backend: str
    fwd_ms: float = math.nan
    bwd_ms: float = math.nan
    fb_ms: float = math.nan
    peak_mb: float = math.nan
    error: str | None = None
    reps: dict = field(default_factory=dict)


def make_inputs(s: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ho, wo = s.out_hw
    x = torch.randn(s.n, s.c, s.h, s.w, generator=g)
    offset = torch.randn(s.n, 18, ho, wo, generator=g)
    mask = torch.randn(s.n, 9, ho, wo, generator=g).sigmoid()
    weight = torch.randn(s.c, s.c, 3, 3, generator=g) / math.sqrt(9 * s.c)
    bias = torch.randn(s.c, generator=g) * 0.1
    grad = torch.randn(s.n, s.c, ho, wo, generator=g)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, offset, mask, weight, bias)]
    return leaves, grad.to(device=device, dtype=dtype)


def forward_fn(backend: str, s: Shape, leaves):
    x, offset, mask, weight, bias = leaves
    if backend == "native":
        return lambda: native.deform_conv2d(x, offset, mask, weight, bias, s.stride, 1, 1)
    if backend == "torchvision":
        return lambda: torchvision.ops.deform_conv2d(x, offset, weight, bias, stride=s.stride, padding=1, mask=mask)
    return lambda: F.conv2d(x, weight, bias, s.stride, 1)


def clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


CLOCK = time.perf_counter  # --clock cpu: time.thread_time (CPU time of this thread; one thread only)


def timed(fn, sync) -> float:
    sync()
    t0 = CLOCK()
    fn()
    sync()
    return CLOCK() - t0


def measure(backend: str, s: Shape, device: torch.device, dtype: torch.dtype, reps: int, budget_s: float,
            stat=statistics.median) -> Result:
    res = Result(s.name, s.group, backend)
    leaves, grad = make_inputs(s, device, dtype)
    fwd = forward_fn(backend, s, leaves)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fb():
        clear_grads(leaves)
        fwd().backward(grad)

    try:
        t_one = timed(fb, sync)  # warm-up (and first-call costs), also sizes the repetitions
        fb()
    except Exception as e:  # noqa: BLE001 - report and go on with the other backends
        res.error = f"{type(e).__name__}: {e}".splitlines()[0][:120]
        return res
    n = max(3, min(reps, int(budget_s / max(t_one, 1e-6))))
    res.reps = {"n": n}

    fwd_t, bwd_t, fb_t = [], [], []
    for _ in range(n):
        clear_grads(leaves)
        fwd_t.append(timed(fwd, sync))
        clear_grads(leaves)
        y = fwd()
        sync()
        bwd_t.append(timed(lambda: y.backward(grad), sync))
        del y
        fb_t.append(timed(fb, sync))
    res.fwd_ms = stat(fwd_t) * 1e3
    res.bwd_ms = stat(bwd_t) * 1e3
    res.fb_ms = stat(fb_t) * 1e3
    clear_grads(leaves)  # free the last step's gradients before measuring (they predate the profiler)
    res.peak_mb = peak_memory_mb(lambda: fwd().backward(grad), device)
    clear_grads(leaves)
    return res


def peak_memory_mb(step, device: torch.device) -> float:
    """Peak extra memory of one step above what is allocated before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == torch._C._autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak / 2**20


def fmt(v: float, width: int, prec: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-".rjust(width)
    if v >= 1000:
        return f"{v:{width}.0f}"
    if v >= 100:
        return f"{v:{width}.1f}"
    return f"{v:{width}.{prec}f}"


def print_table(results: list[Result], shape_list: list[Shape]) -> None:
    by = {(r.shape, r.backend): r for r in results}
    head = (
        f"{'shape':<22}|{'native fwd':>11}{'bwd':>9}{'f+b':>9} |{'torchvision fwd':>16}{'bwd':>9}{'f+b':>9} |"
        f"{'conv f+b':>9} |{'tv/nat':>7}{'nat/conv':>9} |{'peak MB nat':>12}{'tv':>8}{'conv':>8}"
    )
    print(head)
    print("-" * len(head))
    groups: dict[str, list[float]] = {}
    for s in shape_list:
        nat, tv, cv = (by.get((s.name, b)) for b in BACKENDS)
        r_tv = tv.fb_ms / nat.fb_ms if nat and tv else math.nan
        r_cv = nat.fb_ms / cv.fb_ms if nat and cv else math.nan
        print(
            f"{s.name:<22}|{fmt(nat.fwd_ms, 11)}{fmt(nat.bwd_ms, 9)}{fmt(nat.fb_ms, 9)} |"
            f"{fmt(tv.fwd_ms, 16)}{fmt(tv.bwd_ms, 9)}{fmt(tv.fb_ms, 9)} |{fmt(cv.fb_ms, 9)} |"
            f"{fmt(r_tv, 7, 1)}{fmt(r_cv, 9, 1)} |{fmt(nat.peak_mb, 12)}{fmt(tv.peak_mb, 8)}{fmt(cv.peak_mb, 8)}"
        )
        tot = groups.setdefault(s.group, [0.0, 0.0, 0.0])
        tot[0] += nat.fb_ms
        tot[1] += tv.fb_ms
        tot[2] += cv.fb_ms
        for r in (nat, tv, cv):
            if r and r.error:
                print(f"    {r.backend}: {r.error}")
    print("-" * len(head))
    for g, (a, b, c) in groups.items():
        print(f"{g + ' (sum of f+b)':<22}| native {a:9.2f} ms | torchvision {b:9.2f} ms | conv {c:8.2f} ms | "
              f"tv/nat {b / a:5.1f} | nat/conv {a / c:5.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Time native DCNv2 vs torchvision's deform_conv2d vs conv2d (forward, backward, both) "
        "at DyHead's shapes, with peak memory. Times in milliseconds.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="CUDA only; the CPU kernels are float32 (default float32)")
    p.add_argument("--reps", type=int, default=20, help="repetitions per measurement (fewer when a step is slow; min 3)")
    p.add_argument("--budget", type=float, default=3.0,
                   help="seconds of repetitions allowed per backend and measurement (caps --reps; default 3)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: CPU time of the (single) thread, immune to other "
                   "processes taking the cores; implies --threads 1")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic over the repetitions (min is robust when other processes share the CPU)")
    p.add_argument("--coco", action="store_true", help="add the COCO shapes (slow for torchvision on CPU)")
    p.add_argument("--only", default=None, help="comma list of shape groups to run: mini,ref,coco")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--build", action="store_true", help="build the extension first when it is not built")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    global CLOCK
    if args.clock == "cpu":
        if device.type == "cuda":
            print("error: --clock cpu is for the CPU device", file=sys.stderr)
            return 2
        args.threads = 1
        CLOCK = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.is_built() and args.build:
        from dyhead.ops.build import build_extension

        build_extension()
    if not native.is_built():
        print(f"error: native extension unavailable ({native.status()}); run `dyhead build-ext` or pass --build",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and not native.cuda_compiled():
        print("error: the extension was built without CUDA kernels (dyhead build-ext --cuda on)", file=sys.stderr)
        return 2

    groups = args.only.split(",") if args.only else ["mini", "ref"] + (["coco"] if args.coco or device.type == "cuda" else [])
    shape_list = shapes(groups)
    mem_method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                  else "torch.profiler CPU allocator events (peak of running sum)")
    print(f"# torch {torch.__version__}, torchvision {torchvision.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f" ({platform.processor() or platform.machine()})")
          + f", threads {torch.get_num_threads()}, dtype {dtype}, DYHEAD_DCN_CPU_ISA={os.environ.get('DYHEAD_DCN_CPU_ISA', 'auto')}")
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "n/a"
    print(f"# load average before the run: {load} (other processes on these cores inflate the times)")
    print(f"# times: {args.stat} ms ({args.clock} clock) of up to {args.reps} reps (budget {args.budget}s each); fwd records autograd; "
          f"bwd = backward alone; peak MB = extra memory of one fwd+bwd step, via {mem_method}")
    stat = statistics.median if args.stat == "median" else min
    results: list[Result] = []
    t0 = time.perf_counter()
    for s in shape_list:
        for b in BACKENDS:
            results.append(measure(b, s, device, dtype, args.reps, args.budget, stat))
        print(f"  done {s.name} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print_table(results, shape_list)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
