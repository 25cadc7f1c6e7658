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

torchvision's op has no bfloat16 kernels, so with --dtype bfloat16 its column runs in float32.

Shapes (3x3 kernels, padding 1, offsets ~ N(0, 1), mask = sigmoid(N(0, 1))):
    mini : batch 8, 32 channels, levels 16, 8, 4, 2, 1 at stride 1, and the stride-2 branch
           16->8, 8->4, 4->2, 2->1 (DyHead's "low" input from the finer level)
    ref  : batch 8, 64 channels, 40x40, stride 1 (the issue's reference shape)
    coco : batch 2, 256 channels, P3 100x168 and P4 50x84, stride 1 and 2 (opt-in on CPU: --coco)
    check: (with --coco) the COCO P3 shape, stride 1 (`--check-shape` sets another): forward+backward
           of the native op in --dtype beside a plain 3x3 conv of the same shape and dtype and
           torchvision's op in float32, all measured in this run, with the ratios and their targets
           (native <= 3x the conv, torchvision fp32 >= 4x native); then the numerics of the native op
           against torchvision's in float32 on the same (rounded) inputs: the output and all five
           gradients, within the tolerances tests/test_dcn_native.py's CUDA tests state.

    .venv/bin/python benchmarks/dcn.py                 # CPU, mini + ref, a few minutes at most
    .venv/bin/python benchmarks/dcn.py --coco --reps 3
    .venv/bin/python benchmarks/dcn.py --device cuda --dtype bfloat16 --coco
    .venv/bin/python benchmarks/dcn.py --device cpu --coco --only check --check-shape 1,8,6,7   # a smoke run
"""
from __future__ import annotations

import argparse
import functools
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

from dyhead.files import save_json  # noqa: E402
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


COCO_P3 = (2, 256, 100, 168)

# (rtol, atol, gradients divided by max(|reference|, 1) first): what tests/test_dcn_native.py's CUDA
# tests allow against torchvision in float32 (test_cuda_fp32_matches_torchvision,
# test_cuda_half_matches_fp32_reference).
TOLERANCES = {torch.float32: (1e-4, 2e-4, False), torch.float16: (2e-2, 2e-2, True),
              torch.bfloat16: (6e-2, 6e-2, True)}
TARGET_VS_CONV = 3.0  # issue 16: native forward+backward <= 3x a plain 3x3 conv of the same shape and dtype
TARGET_VS_TV = 4.0    # ... and >= 4x faster than torchvision's float32 op


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


def tv_dtype(dtype: torch.dtype) -> torch.dtype:
    """torchvision's deform_conv2d has no bfloat16 kernels: it runs in float32 beside a bfloat16 native op."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


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
    if backend == "torchvision":
        dtype = tv_dtype(dtype)
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
        bwd_t.append(timed(functools.partial(y.backward, grad), sync))
        del y  # free the graph before the next forward
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


def compare(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float, scaled: bool) -> dict:
    """torch.testing.assert_close's rule, |got - ref| <= atol + rtol * |ref|, as numbers."""
    got, ref = got.detach().double(), ref.detach().double()
    if scaled:
        scale = ref.abs().max().clamp_min(1.0)
        got, ref = got / scale, ref / scale
    err = (got - ref).abs()
    allowed = atol + rtol * ref.abs()
    return {"max_abs_err": float(err.max()), "max_err_over_allowed": float((err / allowed).max()),
            "mismatched": int((err > allowed).sum()), "elements": err.numel(), "ok": bool((err <= allowed).all())}


def numerics(s: Shape, device: torch.device, dtype: torch.dtype) -> dict:
    """The native op in `dtype` against torchvision's in float32 on the same rounded inputs and grad."""
    rtol, atol, scaled = TOLERANCES[dtype]
    leaves, grad = make_inputs(s, device, dtype, seed=1)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    y = forward_fn("native", s, leaves)()
    got = torch.autograd.grad(y, leaves, grad)
    x, offset, mask, weight, bias = ref_leaves
    y_ref = torchvision.ops.deform_conv2d(x, offset, weight, bias, stride=s.stride, padding=1, mask=mask)
    ref = torch.autograd.grad(y_ref, ref_leaves, grad.float())
    out = {"tolerance": {"rtol": rtol, "atol": atol, "gradients_scaled_by_max_abs": scaled},
           "output": compare(y, y_ref, rtol, atol, False)}
    for name, a, b in zip(("grad_input", "grad_offset", "grad_mask", "grad_weight", "grad_bias"), got, ref):
        out[name] = compare(a, b, rtol, atol, scaled)
    out["ok"] = all(v["ok"] for k, v in out.items() if k not in ("tolerance",))
    return out


def check(s: Shape, device: torch.device, dtype: torch.dtype, reps: int, budget_s: float, stat) -> dict:
    """Forward+backward of native (dtype), conv (dtype) and torchvision (float32), then the numerics."""
    nat = measure("native", s, device, dtype, reps, budget_s, stat)
    conv = measure("conv", s, device, dtype, reps, budget_s, stat)
    tv = measure("torchvision", s, device, torch.float32, reps, budget_s, stat)
    out = {"shape": asdict(s), "dtype": str(dtype).replace("torch.", ""), "native": asdict(nat), "conv": asdict(conv),
           "torchvision_fp32": asdict(tv), "native_over_conv": nat.fb_ms / conv.fb_ms,
           "tv_fp32_over_native": tv.fb_ms / nat.fb_ms, "target_native_over_conv": TARGET_VS_CONV,
           "target_tv_fp32_over_native": TARGET_VS_TV}
    out["targets_met"] = out["native_over_conv"] <= TARGET_VS_CONV and out["tv_fp32_over_native"] >= TARGET_VS_TV
    out["numerics"] = numerics(s, device, dtype)
    return out


def print_check(c: dict) -> None:
    s = c["shape"]
    print(f"\n# check: forward+backward at batch {s['n']}, {s['c']} channels, {s['h']}x{s['w']}, 3x3, stride "
          f"{s['stride']} (ms, {c['native']['reps'].get('n', 0)} reps)")
    print(f"  native       {c['dtype']:9s} {fmt(c['native']['fb_ms'], 9)}")
    print(f"  conv 3x3     {c['dtype']:9s} {fmt(c['conv']['fb_ms'], 9)}")
    print(f"  torchvision  float32   {fmt(c['torchvision_fp32']['fb_ms'], 9)}")
    print(f"  native / conv = {c['native_over_conv']:.2f} (target <= {TARGET_VS_CONV:g}); torchvision fp32 / native = "
          f"{c['tv_fp32_over_native']:.2f} (target >= {TARGET_VS_TV:g}): {'met' if c['targets_met'] else 'NOT met'}")
    num = c["numerics"]
    tol = num["tolerance"]
    print(f"  numerics vs torchvision float32 on the same rounded inputs (rtol {tol['rtol']:g}, atol {tol['atol']:g}"
          + (", gradients divided by max(|ref|, 1)" if tol["gradients_scaled_by_max_abs"] else "") + "):")
    for name in ("output", "grad_input", "grad_offset", "grad_mask", "grad_weight", "grad_bias"):
        r = num[name]
        print(f"    {name:12s} max |err| {r['max_abs_err']:.3g}, worst err/allowed {r['max_err_over_allowed']:.3g}, "
              f"{r['mismatched']}/{r['elements']} outside: {'ok' if r['ok'] else 'FAIL'}")
    for b in ("native", "conv", "torchvision_fp32"):
        if c[b]["error"]:
            print(f"    {b}: {c[b]['error']}")


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
    p.add_argument("--coco", action="store_true",
                   help="add the COCO shapes (slow for torchvision on CPU) and the check (see above)")
    p.add_argument("--only", default=None, help="comma list of shape groups to run: mini,ref,coco,check")
    p.add_argument("--check-shape", default=",".join(map(str, COCO_P3)),
                   help="N,C,H,W of the check (default %(default)s, COCO's P3 at batch 2)")
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

    groups = (args.only.split(",") if args.only
              else ["mini", "ref"] + (["coco"] if args.coco or device.type == "cuda" else []) + (["check"] if args.coco else []))
    unknown = set(groups) - {"mini", "ref", "coco", "check"}
    if unknown:
        print(f"error: --only: unknown shape group(s) {', '.join(sorted(unknown))}; expected mini, ref, coco, check",
              file=sys.stderr)
        return 2
    try:
        cn, cc, ch, cw = (int(v) for v in args.check_shape.split(","))
        if min(cn, cc, ch, cw) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --check-shape: expected four positive integers N,C,H,W, got {args.check_shape!r}", file=sys.stderr)
        return 2
    check_shape = Shape(f"check {cn}x{cc} {ch}x{cw} s1", "check", cn, cc, ch, cw, 1)
    shape_list = shapes(groups)
    mem_method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                  else "torch.profiler CPU allocator events (peak of running sum)")
    print(f"# torch {torch.__version__}, torchvision {torchvision.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f" ({platform.processor() or platform.machine()})")
          + f", threads {torch.get_num_threads()}, dtype {dtype} (torchvision {tv_dtype(dtype)}), "
          + (f"DYHEAD_DCN_CUDA_GRAD_INPUT={os.environ.get('DYHEAD_DCN_CUDA_GRAD_INPUT', 'gather')}" if device.type == "cuda"
             else f"DYHEAD_DCN_CPU_ISA={os.environ.get('DYHEAD_DCN_CPU_ISA', 'auto')}"))
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
    if shape_list:
        print_table(results, shape_list)
    checked = None
    if "check" in groups:
        checked = check(check_shape, device, dtype, args.reps, args.budget, stat)
        print_check(checked)
    if args.json:
        save_json(args.json, {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
                              "torch": torch.__version__, "results": [asdict(r) for r in results], "check": checked})
    return 0


if __name__ == "__main__":
    sys.exit(main())
