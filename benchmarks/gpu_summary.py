#!/usr/bin/env python
"""The summary that ends benchmarks/gpu_checks.sh: one markdown page from the logs and JSON files of its
output folder (whatever of them exists; a missing or broken file is said, not fatal).

    python benchmarks/gpu_summary.py gpu-logs/
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_line(path: Path, pattern: str) -> str | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    hits = [ln.strip() for ln in lines if re.search(pattern, ln)]
    return hits[-1] if hits else None


def dcn_lines(out: Path) -> list[str]:
    lines = []
    for name in ("dcn_bfloat16", "dcn_float32", "dcn_bfloat16_atomic"):
        data = _load(out / f"{name}.json")
        c = (data or {}).get("check")
        if not c:
            lines.append(f"- {name}: no check in {name}.json")
            continue
        s, num = c["shape"], c["numerics"]
        bad = [k for k, v in num.items() if isinstance(v, dict) and "ok" in v and not v["ok"]]
        lines.append(
            f"- {name}: {s['n']}x{s['c']}x{s['h']}x{s['w']} forward+backward native {c['native']['fb_ms']:.3f} ms, "
            f"conv {c['conv']['fb_ms']:.3f} ms, torchvision fp32 {c['torchvision_fp32']['fb_ms']:.3f} ms; "
            f"native/conv {c['native_over_conv']:.2f} (target <= {c['target_native_over_conv']:g}), "
            f"tv fp32/native {c['tv_fp32_over_native']:.2f} (target >= {c['target_tv_fp32_over_native']:g}): "
            f"{'met' if c['targets_met'] else 'NOT met'}; numerics (rtol {num['tolerance']['rtol']:g}) "
            + ("ok" if num["ok"] else f"FAIL in {', '.join(bad)}"))
    return lines


def train_step_lines(out: Path) -> list[str]:
    lines = []
    for dtype in ("bfloat16", "float32"):
        data = _load(out / f"train_step_{dtype}.json")
        if not data:
            lines.append(f"- train_step {dtype}: no train_step_{dtype}.json")
            continue
        steps = {(r["experiment"], r["backend"]): r["sec_per_step"] * 1e3 for r in data["results"]}
        for r in data.get("dyhead_over_baseline", []):
            cells = [f"{b} {steps[(r['experiment'], b)]:.1f} / {steps[(r['baseline'], b)]:.1f} ms = {r[b]:.2f}x"
                     for b in ("native", "torchvision") if b in r]
            lines.append(f"- train_step {dtype}: {r['experiment']} over {r['baseline']}: {'; '.join(cells)}")
    plain, nhwc = _load(out / "train_step_bfloat16.json"), _load(out / "train_step_bfloat16_channels_last.json")
    if plain and nhwc:  # two invocations of one script minutes apart on the same GPU
        before = {(r["experiment"], r["backend"]): r["sec_per_step"] for r in plain["results"]}
        for r in nhwc["results"]:
            ref = before.get((r["experiment"], r["backend"]))
            if ref:
                lines.append(f"- train_step bfloat16 channels_last: {r['experiment']} [{r['backend']}] "
                             f"{r['sec_per_step'] * 1e3:.1f} ms vs {ref * 1e3:.1f} contiguous = {ref / r['sec_per_step']:.2f}x")
    return lines


def profile_lines(out: Path, top: int = 5) -> list[str]:
    lines = []
    for dtype in ("bfloat16", "float32"):
        data = _load(out / f"profile_{dtype}.json")
        if not data:
            lines.append(f"- profile {dtype}: no profile_{dtype}.json")
            continue
        for m in data["models"]:
            kern = ", ".join(f"{k['name'][:60]} {100 * k['share']:.0f}%" for k in m["kernels"][:top])
            lines.append(f"- profile {dtype} {m['experiment']}: {m['ms_per_step']:.1f} ms of {m['time_kind']} per "
                         f"step; top: {kern}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: gpu_summary.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    lines = ["# gpu_checks summary", ""]
    built = _last_line(out / "build.log", r"built in|up to date|error")
    lines.append(f"- build: {built or 'no build.log'}")
    tests = _last_line(out / "pytest_cuda.log", r"\b(passed|failed|error|no tests ran)\b")
    lines.append(f"- CUDA tests: {tests or 'no pytest_cuda.log'}")
    lines += dcn_lines(out) + train_step_lines(out) + profile_lines(out)
    for f in sorted(out.glob("train_throughput_*.json")):
        data = _load(f)
        scalars = {k: v for k, v in (data or {}).items() if isinstance(v, (int, float, str))}
        lines.append(f"- {f.name}: {json.dumps(scalars)[:400]}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
