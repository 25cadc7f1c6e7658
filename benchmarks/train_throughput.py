#!/usr/bin/env python
"""Training throughput of real `dyhead train` runs, data loading included, and what a paper schedule would cost.

For a baseline and a DyHead experiment (default atss-r50-base-1x and atss-r50-dyh6-LSC-1x) under a profile
(default `cocolike`: COCO's geometry at 800x1333 through the coco profile's models and loader), each
experiment is trained for N iterations by the `dyhead train` command itself, in a scratch root of its own
(params/ copied with the profile's schedule set to N; data/ linked to this checkout's), so runs/<profile> of
the pipeline is never touched and MLflow is off. From the trainer's log.jsonl (one record per iteration:
seconds per iteration and seconds waiting for the batch) it reports, over the iterations after the first
(the first pays for worker start-up and kernel selection; with --iterations 1 it is all there is):

    images/s (data loading included), the share of step time spent waiting for data,
    peak memory (CPU: the training process's peak RSS; GPU: torch.cuda.max_memory_allocated) and per image,
    the hours of a 1x (90k iterations at batch 16) and a 2x schedule on 8 such devices, from the measured
    seconds per image (assumes each device keeps this rate and the 8 scale linearly).

`--evaluate` also times `dyhead evaluate` of each trained model on the profile's first 500 val images (all of
them if fewer). The data and the experiments' stand-in weights are made first if missing (`dyhead synth`,
`dyhead standin-weights`), in this checkout's data/.

    python benchmarks/train_throughput.py                                  # cocolike, 10 iterations each
    python benchmarks/train_throughput.py --iterations 3 --workers 1 --batch 1 --evaluate --json out.json
    python benchmarks/train_throughput.py --device cuda --workers 4        # the profile's batch on one GPU
    python benchmarks/train_throughput.py --from-runs runs/cocolike       # no training: the pipeline's own runs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scratch import REPO, ensure_data, make_scratch, run_dyhead  # noqa: E402
DEFAULT_EXPERIMENTS = ["atss-r50-base-1x", "atss-r50-dyh6-LSC-1x"]
PAPER_SCHEDULES = {"1x": 90_000, "2x": 180_000}  # iterations at batch 16
PAPER_BATCH, PAPER_GPUS = 16, 8

# Run inside each `dyhead train` / `dyhead evaluate` subprocess: the command as the CLI runs it, then the
# peak GPU memory of that process on stdout's last line.
_CHILD = """
import json, sys, torch
from dyhead.cli import main
rc = main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print("BENCH " + json.dumps({"cuda_peak_bytes": peak}))
sys.exit(rc)
"""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="*", default=DEFAULT_EXPERIMENTS,
                   help=f"experiment ids (default: {' '.join(DEFAULT_EXPERIMENTS)})")
    p.add_argument("--profile", default="cocolike", help="profile to train under (default cocolike)")
    p.add_argument("--iterations", type=int, default=10, help="training iterations per experiment (default 10)")
    p.add_argument("--workers", type=int, help="data loader worker processes (default: the profile's num_workers)")
    p.add_argument("--batch", type=int, help="images per iteration (default: the profile's solver.batch_size)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if visible, else cpu")
    p.add_argument("--dtype", choices=sorted(PRECISIONS), help="runtime.precision to train in (bfloat16 -> bf16, "
                   "float32 -> fp32, float16 -> fp16; default: the profile's)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the profile's runtime.threads)")
    p.add_argument("--evaluate", action="store_true", help="also time `dyhead evaluate` of each trained model")
    p.add_argument("--eval-images", type=int, default=500, help="val images to evaluate (default 500, or all if fewer)")
    p.add_argument("--workdir", type=Path, default=REPO / "build" / "bench" / "train_throughput",
                   help="scratch root (params/, runs/); emptied first (default build/bench/train_throughput)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the numbers here")
    p.add_argument("--from-runs", type=Path, metavar="DIR",
                   help="train nothing: summarise the finished runs under DIR (e.g. runs/cocolike after the "
                        "pipeline), from their train.json, log.jsonl and metrics.json")
    args = p.parse_args(argv)
    if args.from_runs and not args.from_runs.is_dir():
        p.error(f"--from-runs {args.from_runs}: not a folder")
    if args.iterations < 1 or (args.batch is not None and args.batch < 1) or args.eval_images < 1:
        p.error("--iterations, --batch and --eval-images must be >= 1")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    return args


PRECISIONS = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}  # the other benchmarks' --dtype names


def _dyhead(args: list[str], root: Path) -> tuple[float, dict]:
    """`dyhead ARGS` in `root` as a child process: (wall seconds, what the child reported)."""
    wall, proc = run_dyhead(root, args, child=_CHILD, capture=True)
    report = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    return wall, json.loads(report[-1][6:]) if report else {}


def make_root(args, device: str) -> tuple[Path, dict]:
    """The scratch root: params/ with the profile set to N iterations (and the asked-for batch, workers,
    device), data/ linked to this checkout's. Returns it and the profile as changed."""
    def edit(profile: dict) -> None:
        solver, rt = profile["solver"], profile["runtime"]
        solver["schedules"] = {name: args.iterations for name in solver["schedules"]}
        solver["log_period"] = 1  # a log.jsonl record per iteration
        solver["checkpoint_period"] = args.iterations + 1  # no checkpoint writes inside the timed steps
        if args.batch:
            solver["batch_size"] = args.batch
        if args.workers is not None:
            rt["num_workers"] = args.workers
        rt["device"] = device
        if args.dtype:
            rt["precision"] = PRECISIONS[args.dtype]

    return make_scratch(args.workdir, args.profile, edit)


def ensure_inputs(root: Path, profile_name: str, profile: dict, experiments: list[str], eval_images: int) -> int:
    """Data and the experiments' stand-in weights in place (made if missing); with more val images than
    `eval_images`, the profile reads a subset file. Returns the number of val images an evaluation reads."""
    from dyhead.config import load_matrix
    from dyhead.modeling.pretrained import arch_of_standin

    data = profile["data"]
    ensure_data(root, profile_name, profile, capture=True)
    matrix = load_matrix(root, profile_name)
    for exp in experiments:
        if exp not in matrix.experiments:
            raise SystemExit(f"unknown experiment {exp!r} (`dyhead list --profile {profile_name}`)")
        weights = profile["model"]["backbones"][matrix.experiments[exp]["backbone"]].get("weights") or ""
        if arch_of_standin(weights):
            _dyhead(["standin-weights", arch_of_standin(weights), "--dir", str(Path(weights).parent)], root)
    val = json.loads((root / data["val_annotations"]).read_text())
    if len(val["images"]) <= eval_images:
        return len(val["images"])
    keep = {im["id"] for im in val["images"][:eval_images]}
    subset = dict(val, images=val["images"][:eval_images],
                  annotations=[a for a in val["annotations"] if a["image_id"] in keep])
    (root / "val_subset.json").write_text(json.dumps(subset))
    path = root / "params" / "profiles" / f"{profile_name}.yaml"
    profile["data"]["val_annotations"] = str(root / "val_subset.json")
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return eval_images


def steady_state(records: list[dict]) -> dict:
    """Seconds and data-wait seconds of the iterations after the first, from per-iteration log records
    (sec_per_iter is the running mean since the start, so iteration k took k*s_k - (k-1)*s_(k-1))."""
    totals = [r["iteration"] * r["sec_per_iter"] for r in records]
    if len(records) > 1:
        return {"iterations": len(records) - 1, "seconds": totals[-1] - totals[0],
                "data_seconds": sum(r["data_sec_per_iter"] for r in records[1:])}
    return {"iterations": 1, "seconds": totals[0], "data_seconds": records[0]["data_sec_per_iter"]}


def summarise(run: Path) -> dict:
    """Throughput, data wait and peak memory of one finished training, from its own files (train.json,
    log.jsonl with a record per iteration, and metrics.json when it was evaluated)."""
    train = json.loads((run / "train.json").read_text())
    settings = train["config"]["profile_settings"]
    from dyhead.report.figures import read_log

    records = read_log(run / "log.jsonl")[0]  # the per-iteration records, without the AP-curve points
    if not records:
        raise SystemExit(f"{run}/log.jsonl has no per-iteration records")
    steady = steady_state(records)
    batch = settings["solver"]["batch_size"]
    per_image = steady["seconds"] / (steady["iterations"] * batch)
    result = {
        "experiment": train["experiment"], "device": train["device"], "batch": batch,
        "workers": settings["runtime"]["num_workers"], "threads": train["threads"], "precision": train["precision"],
        "dcn_backend": train["dcn_backend"], "iterations": len(records), "timed_iterations": steady["iterations"],
        "first_iteration_seconds": records[0]["sec_per_iter"],
        "seconds_per_iteration": steady["seconds"] / steady["iterations"],
        "images_per_second": 1.0 / per_image, "seconds_per_image": per_image,
        "data_wait_fraction": steady["data_seconds"] / steady["seconds"] if steady["seconds"] > 0 else 0.0,
        "peak_memory_mb": train["peak_rss_mb"], "peak_memory_per_image_mb": round(train["peak_rss_mb"] / batch, 1),
        "peak_memory_kind": "peak RSS of the training process",
        "projected_hours_8_devices": {name: iters * PAPER_BATCH * per_image / PAPER_GPUS / 3600
                                      for name, iters in PAPER_SCHEDULES.items()},
    }
    if (run / "metrics.json").exists():
        metrics = json.loads((run / "metrics.json").read_text())
        result["evaluate"] = {"images": metrics["images"], "eval_seconds": metrics.get("eval_seconds"),
                              "images_per_second": metrics["images"] / metrics["eval_seconds"]
                              if metrics.get("eval_seconds") else None}
    return result


def measure(exp: str, root: Path, args, device: str) -> dict:
    threads = ["--threads", str(args.threads)] if args.threads else []
    wall, child = _dyhead(["train", exp, "--profile", args.profile, *threads], root)
    run = root / "runs" / args.profile / exp
    eval_wall = _dyhead(["evaluate", exp, "--profile", args.profile, *threads], root)[0] if args.evaluate else None
    result = {**summarise(run), "train_wall_seconds": round(wall, 2)}
    if device == "cuda":
        peak_mb = child["cuda_peak_bytes"] / 2**20
        result.update(peak_memory_mb=round(peak_mb, 1), peak_memory_per_image_mb=round(peak_mb / result["batch"], 1),
                      peak_memory_kind="cuda max_memory_allocated")
    if eval_wall is not None:
        result["evaluate"]["wall_seconds"] = round(eval_wall, 2)
    return result


def table(results: list[dict]) -> str:
    head = ("| experiment | device | batch | workers | timed its | img/s | data wait | peak MB | MB/img "
            "| 1x h (8 dev) | 2x h (8 dev) | eval img/s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        ev = r.get("evaluate") or {}
        ev_rate = f"{ev['images_per_second']:.3f} ({ev['images']} img)" if ev.get("images_per_second") else "–"
        h = r["projected_hours_8_devices"]
        lines.append(f"| {r['experiment']} | {r['device']} | {r['batch']} | {r['workers']} | {r['timed_iterations']} "
                     f"| {r['images_per_second']:.4f} | {100 * r['data_wait_fraction']:.1f}% | {r['peak_memory_mb']:.0f} "
                     f"| {r['peak_memory_per_image_mb']:.0f} | {h['1x']:.1f} | {h['2x']:.1f} | {ev_rate} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if args.from_runs:
        runs = sorted(d for d in args.from_runs.iterdir() if (d / "train.json").exists())
        if not runs:
            raise SystemExit(f"no finished training (train.json) under {args.from_runs}")
        results = [summarise(run) for run in runs]
        device, iterations = results[0]["device"], None
        print(f"# finished runs under {args.from_runs}; first iteration excluded where there are more")
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        root, profile = make_root(args, device)
        ensure_inputs(root, args.profile, profile, args.experiments, args.eval_images)
        results = []
        for exp in args.experiments:
            print(f"# training {exp}: {args.iterations} iterations at batch {profile['solver']['batch_size']} "
                  f"on {device}, {profile['runtime']['num_workers']} loader worker(s)", file=sys.stderr, flush=True)
            results.append(measure(exp, root, args, device))
        iterations = args.iterations
        print(f"# profile {args.profile}, {device}, torch {torch.__version__}; first iteration excluded where there "
              f"are more")
    print(f"# projections: 1x = {PAPER_SCHEDULES['1x']} iterations x {PAPER_BATCH} images over {PAPER_GPUS} devices "
          f"at the measured seconds per image")
    print(table(results))
    if args.json:
        from dyhead.files import save_json

        save_json(args.json, {"profile": args.profile, "device": device, "iterations": iterations,
                              "torch": torch.__version__, "from_runs": str(args.from_runs) if args.from_runs else None,
                              "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
