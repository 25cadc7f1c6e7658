"""Does mixed precision cost accuracy? One experiment trained and evaluated again in bf16 (or fp16), its AP
set beside the same experiment's fp32 run and the fp32 seed noise, both taken from a finished pipeline run.

    snakemake --cores all reports/table2.md               # first: the fp32 runs, with the 6-block noise pair
    python benchmarks/precision_pair.py                   # atss-r50-dyh6-LSC-1x on mini in bf16
    python benchmarks/precision_pair.py --profile tiny --precision fp16 atss-r50-dyh1-LSC-1x --runs runs/tiny

The new run trains with `dyhead train` itself in a scratch root (params/ copied with `runtime.precision`
changed, data/ linked to this checkout's, MLflow off), so the pipeline's runs/ are never touched; every
other setting, the seed included, is the fp32 run's. The noise is |AP(exp) - AP(exp-seed1)| of the two fp32
runs that differ only in their seed: a precision gap at or under it cannot be told from seed noise.
On CPU, bf16 runs through autocast (oneDNN bf16 kernels where the CPU has AVX512-BF16 or AMX).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scratch import REPO, ensure_data, make_scratch, run_dyhead  # noqa: E402
METRICS = ("AP", "AP50", "AP75")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?", default="atss-r50-dyh6-LSC-1x",
                   help="experiment id (default atss-r50-dyh6-LSC-1x, Table 2's noise pair)")
    p.add_argument("--profile", default="mini", help="profile (default mini)")
    p.add_argument("--precision", choices=["bf16", "fp16"], default="bf16", help="precision to train in (default bf16)")
    p.add_argument("--runs", type=Path, help="the fp32 runs to compare with (default runs/<profile>)")
    p.add_argument("--workdir", type=Path, default=REPO / "build" / "bench" / "precision_pair",
                   help="scratch root; emptied first (default build/bench/precision_pair)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the result here")
    return p.parse_args(argv)


def read_metrics(path: Path) -> dict:
    if not path.exists():
        raise SystemExit(f"precision_pair: {path} is missing: run the pipeline first (the fp32 run and its -seed1 "
                         f"twin), e.g. `snakemake --cores all reports/table2.md`")
    metrics = json.loads(path.read_text())["metrics"]
    return {k: metrics[k] for k in METRICS}


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = (args.runs or REPO / "runs" / args.profile).resolve()
    fp32 = read_metrics(runs / args.experiment / "metrics.json")
    seed1 = read_metrics(runs / f"{args.experiment}-seed1" / "metrics.json")
    root, profile = make_scratch(args.workdir, args.profile,
                                 lambda profile: profile["runtime"].update(precision=args.precision))
    ensure_data(root, args.profile, profile)
    train_s = run_dyhead(root, ["train", args.experiment, "--profile", args.profile])[0]
    eval_s = run_dyhead(root, ["evaluate", args.experiment, "--profile", args.profile])[0]
    run = root / "runs" / args.profile / args.experiment
    low = read_metrics(run / "metrics.json")
    precision = json.loads((run / "train.json").read_text())["precision"]
    if precision != args.precision:
        raise SystemExit(f"precision_pair: the run trained in {precision}, not {args.precision}")
    noise = abs(fp32["AP"] - seed1["AP"])
    gap = low["AP"] - fp32["AP"]
    verdict = "within" if abs(gap) <= noise else "outside"
    print(f"| {args.experiment} ({args.profile}) | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, m in (("fp32", fp32), ("fp32, seed 1", seed1), (args.precision, low)):
        print(f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in METRICS) + " |")
    print(f"{args.precision} - fp32: {gap:+.2f} AP; seed noise |fp32 - seed 1|: {noise:.2f} AP -> {verdict} the noise "
          f"({args.precision} training {train_s:.0f} s, evaluation {eval_s:.0f} s)")
    if args.json:
        from dyhead.files import save_json

        save_json(args.json, {"experiment": args.experiment, "profile": args.profile, "precision": args.precision,
                              "fp32": fp32, "fp32_seed1": seed1, args.precision: low, "gap_ap": round(gap, 2),
                              "noise_ap": round(noise, 2), "within_noise": verdict == "within",
                              "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
