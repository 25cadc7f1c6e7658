#!/usr/bin/env python
"""End to end: `snakemake reports/table2.md` on the mini profile with the native deformable conv
and with torchvision's, the same params otherwise, one after the other in this process.

The whole pipeline is timed (trainings, evaluations, FLOPs, the report), not the op alone, so the
ratio is what a user of the mini profile gains. Each backend runs in its own scratch copy of the
repository (tracked files only) that shares this checkout's synthetic data and built extension,
so neither run finds the other's outputs. `--iterations` shortens the 1x schedule for both runs
alike (evaluation on all 1000 validation images stays), which keeps the torchvision run affordable
on a 2-core machine; the default is the profile's own 1000.

    .venv/bin/python benchmarks/pipeline_backends.py --iterations 200
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def scratch_copy(dest: Path, iterations: int | None, backend: str) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
        elif src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / name)
    prof_path = dest / "params/profiles/mini.yaml"
    prof = yaml.safe_load(prof_path.read_text())
    prof["runtime"]["dcn_backend"] = backend
    if iterations:
        prof["solver"]["schedules"]["1x"] = iterations
        prof["solver"]["warmup_iters"] = min(prof["solver"]["warmup_iters"], iterations // 4)
    prof_path.write_text(yaml.safe_dump(prof, sort_keys=False))
    # the same inputs for both runs: this checkout's synthetic set and extension, made once
    for shared in ("data/synthetic", "build/ext"):
        if (ROOT / shared).exists():
            (dest / shared).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(ROOT / shared, dest / shared)


def run(backend: str, iterations: int | None, cores: int, keep: Path | None) -> float:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"dyhead-bench-{backend}-", dir=keep))
    scratch_copy(work, iterations, backend)
    env = {**os.environ, "DYHEAD_TRACKING": "off"}  # time the pipeline, not the MLflow store
    cmd = [sys.executable, "-m", "snakemake", "reports/table2.md", "--cores", str(cores), "--quiet", "rules"]
    print(f"[{backend}] {' '.join(cmd[1:])}  (in {work})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"[{backend}] snakemake failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"[{backend}] reports/table2.md in {seconds:.0f} s", flush=True)
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=None, help="1x schedule for both runs (default: the profile's)")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="snakemake --cores (default: all)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the two scratch runs under this directory")
    args = ap.parse_args()
    if not (ROOT / "data/synthetic").exists() or not (ROOT / "build/ext/manifest.json").exists():
        sys.exit("run `dyhead synth` and `dyhead build-ext` first (or any snakemake target): both runs share them")
    native = run("native", args.iterations, args.cores, args.keep)
    tv = run("torchvision", args.iterations, args.cores, args.keep)
    sched = f"{args.iterations} iterations per 1x training" if args.iterations else "the profile's 1x schedule"
    print(f"\nmini reports/table2.md end to end ({sched}, {args.cores} cores):")
    print(f"  native      {native:8.0f} s")
    print(f"  torchvision {tv:8.0f} s")
    print(f"  torchvision / native = {tv / native:.2f}x")


if __name__ == "__main__":
    main()
