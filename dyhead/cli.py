"""The `dyhead` command: every pipeline step is one subcommand that reads files and writes files.

Snakemake, DVC and people call exactly these commands. Errors in the input print one line
(`dyhead: error: ...`) and exit with status 2; nothing is left half-written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dyhead.config import DEFAULT_PROFILE
from dyhead.errors import DyheadError


def _profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"params/profiles/<name>.yaml to run under (default: {DEFAULT_PROFILE})")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the profile's runtime.threads)")
    p.add_argument("--dcn-backend", choices=["auto", "native", "torchvision"],
                   help="deformable-conv implementation (default: the profile's runtime.dcn_backend)")


def cmd_synth(args) -> None:
    from dyhead.config import load_profile
    from dyhead.data.synthetic import make_synthetic_coco

    profile = load_profile(args.profile)
    data = profile["data"]
    if data["source"] != "synthetic":
        raise DyheadError(f"profile {args.profile} reads {data['source']} data; `dyhead synth` makes synthetic data")
    summary = make_synthetic_coco(Path(data["root"]), **data["synthetic"])
    print(f"synthetic data in {data['root']}: {summary}")


def cmd_train(args) -> None:
    from dyhead.config import resolve
    from dyhead.engine.train import train

    train(resolve(args.experiment, args.profile), threads=args.threads, backend=args.dcn_backend,
          stop_at=args.stop_at)


def cmd_evaluate(args) -> None:
    from dyhead.config import resolve
    from dyhead.engine.evaluate import evaluate

    evaluate(resolve(args.experiment, args.profile), threads=args.threads, backend=args.dcn_backend)


def cmd_flops(args) -> None:
    from dyhead.config import resolve
    from dyhead.engine.checkpoint import save_json
    from dyhead.engine.flops import PAPER_INPUT, count_run

    run = resolve(args.experiment, args.profile)
    paper = count_run(resolve(args.experiment, "coco"), PAPER_INPUT, num_classes=80)
    size = run.profile["input"]["min_size_test"]
    div = run.profile["input"]["size_divisible"]
    padded = ((size + div - 1) // div * div,) * 2
    classes = run.profile["data"].get("synthetic", {}).get("num_classes", 80)
    own = count_run(run, padded, num_classes=classes)
    record = {"experiment": args.experiment, "convention": "multiply-adds (GMACs), deformable convs counted",
              "coco": paper, args.profile: own}
    out = Path(args.out) if args.out else run.run_dir / "flops.json"
    save_json(out, record)
    print(f"[{args.experiment}] {paper['gmacs']:.2f} GMACs at {PAPER_INPUT[0]}x{PAPER_INPUT[1]} (coco profile); "
          f"{own['gmacs']:.3f} GMACs at {padded[0]}x{padded[1]} ({args.profile}) -> {out}")


def cmd_report(args) -> None:
    from dyhead.config import load_matrix
    from dyhead.report.tables import write_table

    matrix = load_matrix()
    if args.table not in matrix.tables:
        raise DyheadError(f"unknown table {args.table!r}; params/tables.yaml defines {', '.join(sorted(matrix.tables))}")
    out = Path(args.out or f"reports/{args.table}.md")
    write_table(args.table, matrix, args.profile, out)
    print(f"wrote {out} (profile {args.profile})")


def cmd_list(args) -> None:
    from dyhead.config import load_matrix

    matrix = load_matrix()
    for exp, spec in matrix.experiments.items():
        print(f"{exp:32s} tables: {','.join(matrix.tables_of(exp)) or '-'}")


def cmd_build_ext(args) -> None:
    from dyhead.ops import build

    build.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dyhead",
        description="Dynamic Head experiment pipeline. Each subcommand is one step of the Snakemake DAG: "
                    "synth -> build-ext -> train -> evaluate -> flops -> report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="make the deterministic synthetic COCO-format data set of a profile")
    _profile_arg(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("build-ext", help="compile the native deformable-conv extension (CPU; CUDA where nvcc is)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the builder (see dyhead build-ext --help)")
    p.set_defaults(func=cmd_build_ext)

    p = sub.add_parser("train", help="train one experiment into runs/<profile>/<experiment>/ (resumes by itself)")
    p.add_argument("experiment", help="an id from params/experiments.yaml (`dyhead list`)")
    _profile_arg(p)
    _runtime_args(p)
    p.add_argument("--stop-at", type=int, help="stop after this iteration without finishing (for tests)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="predict on the validation set; write predictions.json and metrics.json")
    p.add_argument("experiment")
    _profile_arg(p)
    _runtime_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("flops", help="count GMACs of the coco-profile model at 800x1344 and of the profile's model")
    p.add_argument("experiment")
    _profile_arg(p)
    p.add_argument("--out", help="output JSON (default: runs/<profile>/<experiment>/flops.json)")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("report", help="write reports/<table>.md from the runs' metrics and FLOPs")
    p.add_argument("table", help="table1 | table2 | ... (params/tables.yaml)")
    _profile_arg(p)
    p.add_argument("--out", help="output file (default: reports/<table>.md)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("list", help="list the experiments and the tables each feeds")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DyheadError as exc:
        print(f"dyhead: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dyhead: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
