#!/usr/bin/env python
"""Training-step time of this checkout against an earlier revision, measured in one run.

The revision's tree is exported with `git archive` into a scratch folder and its extension built there
(`dyhead build-ext --cuda off`), so each side runs its own model code and its own native op. Every
measurement is a fresh child process that builds one experiment's detector exactly as `dyhead train`
does (random weights, no ImageNet file needed), trains it on one fixed random batch of the profile's
size with SGD, and prints the median seconds of `--steps` steps after `--warmup`. The children
alternate (revision, this checkout, revision, ...) for `--rounds` rounds, so that a drift of the
machine's speed falls on both sides alike; the table gives the median over rounds and the ratio
revision / this checkout (above 1: this checkout is faster).

`--set KEY=VALUE` changes a profile setting for this checkout's side only, so `--ref HEAD --set ...`
times a setting against the same code without it.

    python benchmarks/step_pair.py --ref d1d7abc                      # mini: ATSS baseline and 6 blocks
    python benchmarks/step_pair.py --ref HEAD~3 --rounds 5 atss-r50-dyh2-LSC-1x --json pair.json
    python benchmarks/step_pair.py --ref HEAD --set runtime.memory_format=channels_last
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scratch import CLI, REPO  # noqa: E402

DEFAULT_EXPERIMENTS = ["atss-r50-base-1x", "atss-r50-dyh6-LSC-1x"]

# Runs in a child whose sys.path starts with one checkout: only dyhead's public entry points, which both
# sides have, and a batch drawn from a fixed seed, the same on both sides.
CHILD = r"""
import json, statistics, sys, time
import torch
from dyhead.config import resolve
from dyhead.modeling.build import build_detector
from dyhead.ops import resolve_backend

exp, profile, steps, warmup, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
run = resolve(exp, profile)
prof = run.profile
for key, value in json.loads(sys.argv[6]).items():  # --set, this checkout's side only
    *parents, leaf = key.split(".")
    node = prof
    for k in parents:
        node = node[k]
    node[leaf] = value
classes = prof["data"].get("synthetic", {}).get("num_classes", 80)
torch.manual_seed(0)
model = build_detector(run, classes, resolve_backend(prof["runtime"]["dcn_backend"]), load_weights=False).train()
params = [p for p in model.parameters() if p.requires_grad]
solver = prof["solver"]
opt = torch.optim.SGD(params, lr=solver["base_lr"] * 0.01, momentum=solver["momentum"],
                      weight_decay=solver["weight_decay"])
size = prof["input"]["min_size_train"]
size = size if isinstance(size, int) else max(size)
g = torch.Generator().manual_seed(0)
images = [torch.rand(3, size, size, generator=g) for _ in range(solver["batch_size"])]
targets = []
for _ in images:
    wh = torch.rand(4, 2, generator=g) * 0.46 + 0.04
    xy = torch.rand(4, 2, generator=g) * (1 - wh)
    targets.append({"boxes": torch.cat([xy, xy + wh], 1) * size, "labels": torch.randint(0, classes, (4,), generator=g)})
times = []
for i in range(warmup + steps):
    t0 = time.perf_counter()
    losses = model(images, targets)
    opt.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    opt.step()
    if i >= warmup:
        times.append(time.perf_counter() - t0)
conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)
layout = "channels_last" if not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last) else "contiguous"
print(json.dumps({"sec_per_step": statistics.median(times), "loss": float(sum(losses.values())), "layout": layout}))
"""


def resolve_commit(rev: str) -> str:
    """The full commit id of `rev`; one-line exit when git cannot resolve it."""
    try:
        return subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"--ref {rev}: not a commit of {REPO}") from None


def export_revision(commit: str, dest: Path) -> None:
    """The tree of `commit` under dest."""
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", "--format=tar", commit], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {commit} failed")


def side_env(root: Path, ext_dir: Path) -> dict:
    """A child that imports dyhead from `root` and loads the extension built in `ext_dir`."""
    env = dict(os.environ, DYHEAD_EXT_DIR=str(ext_dir), DYHEAD_TRACKING="off")
    env["PYTHONPATH"] = str(root)
    return env


def same_sources(a: Path, b: Path) -> bool:
    """Whether two checkouts' extension sources (dyhead/csrc) are byte for byte the same."""
    files = lambda root: sorted(p.relative_to(root) for p in (root / "dyhead/csrc").rglob("*") if p.is_file())  # noqa: E731
    return files(a) == files(b) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))


def build_ext(root: Path, ext_dir: Path, label: str) -> None:
    if (ext_dir / "manifest.json").exists():
        return
    print(f"[step_pair] building the extension of {label} (CPU only) ...", flush=True)
    proc = subprocess.run([sys.executable, "-c", CLI, "build-ext", "--build-dir", str(ext_dir), "--cuda", "off"],
                          cwd=root, env=side_env(root, ext_dir), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"build-ext of {label} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")


def parse_settings(items: list[str]) -> dict:
    """`--set section.key=value` pairs; values read as YAML (numbers, booleans, lists), strings as they are."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or "." not in key:
            raise SystemExit(f"--set {item}: expected SECTION.KEY=VALUE, e.g. runtime.memory_format=channels_last")
        out[key] = yaml.safe_load(value)
    return out


def time_side(root: Path, ext_dir: Path, exp: str, args, settings: dict | None = None) -> dict:
    argv = [exp, args.profile, str(args.steps), str(args.warmup), str(args.threads), json.dumps(settings or {})]
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=root, env=side_env(root, ext_dir),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{exp} in {root}: the timing child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="*", help=f"experiment ids (default: {' '.join(DEFAULT_EXPERIMENTS)})")
    p.add_argument("--ref", required=True, help="the earlier revision (a commit, tag or branch of this repository)")
    p.add_argument("--profile", default="mini", help="profile whose model, batch and image size are used (default mini)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per experiment (default 3)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per child (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1, as mini's trainings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a profile setting for this checkout's side only (repeatable), e.g. runtime.memory_format=channels_last")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    for name in ("rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    settings = parse_settings(args.set)
    commit = resolve_commit(args.ref)
    if not (REPO / "build" / "ext" / "manifest.json").exists():
        raise SystemExit("this checkout's extension is not built: run `dyhead build-ext` first")
    exps = args.experiments or DEFAULT_EXPERIMENTS

    with tempfile.TemporaryDirectory(prefix="dyhead-step-pair-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        ref_root = work / "ref"
        if ref_root.exists():
            raise SystemExit(f"{ref_root} exists: pass an empty --workdir")
        export_revision(commit, ref_root)
        # the revision shares this checkout's extension when its sources are the same, else builds its own
        ref_ext = REPO / "build" / "ext" if same_sources(ref_root, REPO) else ref_root / "build" / "ext"
        sides = {"ref": (ref_root, ref_ext), "this": (REPO, REPO / "build" / "ext")}
        build_ext(*sides["ref"], f"{args.ref} ({commit[:10]})")
        print(f"# {args.profile}: {args.rounds} rounds x {args.steps} steps (after {args.warmup}), {args.threads} "
              f"thread(s); ref {args.ref} = {commit[:10]}"
              + (f"; this checkout with {', '.join(args.set)}" if args.set else ""), flush=True)
        rows = []
        for exp in exps:
            got, layout = {"ref": [], "this": []}, {}
            for r in range(args.rounds):
                for side in ("ref", "this"):
                    t0 = time.perf_counter()
                    res = time_side(*sides[side], exp, args, settings if side == "this" else None)
                    got[side].append(res["sec_per_step"])
                    layout[side] = res["layout"]
                    print(f"  {exp:32s} round {r + 1} {side:4s} {res['sec_per_step'] * 1000:8.1f} ms/step "
                          f"(child {time.perf_counter() - t0:.0f} s)", flush=True)
            ref_s, this_s = statistics.median(got["ref"]), statistics.median(got["this"])
            rows.append({"experiment": exp, "ref_sec_per_step": ref_s, "this_sec_per_step": this_s,
                         "ref_over_this": ref_s / this_s, "ref_all": got["ref"], "this_all": got["this"],
                         "ref_layout": layout["ref"], "this_layout": layout["this"]})

    print(f"\n| experiment | {args.ref} ms/step | this checkout ms/step | {args.ref} / this |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['experiment']} | {r['ref_sec_per_step'] * 1000:.1f} | {r['this_sec_per_step'] * 1000:.1f} | "
              f"{r['ref_over_this']:.2f}x |")
    if args.json:
        from dyhead.files import save_json

        save_json(args.json, {"ref": args.ref, "ref_commit": commit, "profile": args.profile, "rounds": args.rounds,
                              "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "settings": settings,
                              "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
