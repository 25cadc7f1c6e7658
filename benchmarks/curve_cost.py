"""What the AP learning curve costs: per finished training, the seconds its curve points took against the
seconds of the rest of the training, read from the run's own files (no new training).

    python benchmarks/curve_cost.py                    # every run of runs/mini
    python benchmarks/curve_cost.py --runs runs/mini --json out.json

Each curve point's wall time is logged as `curve_seconds` in log.jsonl; `train_seconds` in train.json is the
whole training loop, curve points included. The cost printed is curve / (train - curve): how much longer the
training ran than it would have without the curve. Both numbers come from the same process under the same
load, so the ratio holds even when other jobs shared the cores (the absolute seconds do not).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_cost(run_dir: Path) -> dict | None:
    """Curve and training seconds of one finished run; None when it has no train.json or no curve point."""
    from dyhead.report.figures import read_log

    train_json, log = run_dir / "train.json", run_dir / "log.jsonl"
    if not train_json.exists() or not log.exists():
        return None
    train = json.loads(train_json.read_text())
    points = [r for r in read_log(log)[1] if "curve_seconds" in r]
    if not points or train.get("resumed_from", 0):
        return None  # a resumed run's train_seconds covers only its last part
    curve = sum(p["curve_seconds"] for p in points)
    total = train["train_seconds"]
    return {"experiment": run_dir.name, "iterations": train["iterations"], "points": len(points),
            "images": points[-1]["curve_images"], "train_seconds": total, "curve_seconds": round(curve, 1),
            "cost": round(curve / (total - curve), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs/mini"), help="a profile's runs folder (default: runs/mini)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    if not args.runs.is_dir():
        sys.exit(f"curve_cost: {args.runs} is not a folder of runs")
    rows = [r for d in sorted(args.runs.iterdir()) if d.is_dir() and (r := run_cost(d))]
    if not rows:
        sys.exit(f"curve_cost: no finished run with curve points under {args.runs}")
    print("| experiment | iterations | points × images | train s | curve s | cost |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['experiment']} | {r['iterations']} | {r['points']} × {r['images']} | {r['train_seconds']:.0f} "
              f"| {r['curve_seconds']:.1f} | {100 * r['cost']:.1f}% |")
    worst = max(rows, key=lambda r: r["cost"])
    total = sum(r["curve_seconds"] for r in rows) / sum(r["train_seconds"] - r["curve_seconds"] for r in rows)
    print(f"all runs: {100 * total:.1f}% longer with the curve; the most: {worst['experiment']} {100 * worst['cost']:.1f}%")
    if args.json:
        from dyhead.files import save_json  # atomic: a killed run leaves no half-written file

        save_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
