"""The `dyhead` command: every pipeline step is one subcommand that reads files and writes files.

Snakemake, DVC and people call exactly these commands. Errors in the input print one line
(`dyhead: error: ...`) and exit with status 2; nothing is left half-written.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dyhead.config import DEFAULT_PROFILE
from dyhead.errors import DyheadError


def _profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"params/profiles/<name>.yaml to run under (default: {DEFAULT_PROFILE})")


def _seeds_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, help="seed runs per table row to read (default: the profile's `seeds`, else 1)")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the profile's runtime.threads)")
    p.add_argument("--dcn-backend", choices=["auto", "native", "torchvision"],
                   help="deformable-conv implementation (default: the profile's runtime.dcn_backend)")


def _launch_args(p: argparse.ArgumentParser) -> None:
    from dyhead.engine.launch import PROCESSES_ENV, processes_arg

    p.add_argument("--processes", type=processes_arg, default="1", metavar="auto|N",
                   help=f"processes on this node (default 1); more re-run the command under torchrun. auto: "
                        f"${PROCESSES_ENV} if set, else one per visible GPU when the profile runs on CUDA, else 1")
    p.add_argument("--nnodes", type=int, default=1,
                   help="nodes of one job, one launcher per node (srun): torchrun's c10d rendezvous joins them")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="with --nnodes > 1: the rendezvous on the first node")
    p.add_argument("--rdzv-id", help="with --nnodes > 1: the job's id, the same on every node "
                   "(default: $SLURM_JOB_ID)")


def _launch(args, run) -> None:
    """Returns in the process that runs the stage; with more than one process in all, torchrun replaces
    this one and runs the same arguments in each worker."""
    from dyhead.engine.launch import check_batch, plan, relaunch

    launch = plan(args.processes, run.profile["runtime"]["device"], args.nnodes, args.rdzv_endpoint, args.rdzv_id)
    if args.command == "train":
        check_batch(run.profile["solver"]["batch_size"], launch, f"params/profiles/{run.profile_name}.yaml")
    relaunch(launch, args.argv)


def cmd_synth(args) -> None:
    from dyhead.config import load_profile
    from dyhead.data.synthetic import make_synthetic_coco

    profile = load_profile(args.profile)
    data = profile["data"]
    if data["source"] == "cocolike":  # COCO's geometry and layout (dyhead/data/cocolike.py)
        from dyhead.data.cocolike import make_cocolike

        summary = make_cocolike(Path(data["root"]), **data["cocolike"])
    elif data["source"] == "synthetic":
        summary = make_synthetic_coco(Path(data["root"]), **data["synthetic"])
    else:
        raise DyheadError(f"profile {args.profile} reads {data['source']} data; `dyhead synth` makes synthetic data")
    print(f"synthetic data in {data['root']}: {summary}")
    check_profile_images(data, ("train", "val"))


def check_profile_images(data: dict, splits) -> None:
    from dyhead.data.check import check_images

    for split in splits:
        check_images(Path(data[f"{split}_images"]), Path(data[f"{split}_annotations"]))


def cmd_check_data(args) -> None:
    from dyhead.config import load_profile

    data = load_profile(args.profile)["data"]
    check_profile_images(data, ("train", "val") if args.split == "all" else (args.split,))


def cmd_train(args) -> None:
    from dyhead.config import resolve

    run = resolve(args.experiment, args.profile)
    _launch(args, run)
    from dyhead.engine.train import train  # after the launch: a launcher that hands over to torchrun never loads it

    train(run, threads=args.threads, backend=args.dcn_backend, stop_at=args.stop_at, force=args.force)


def cmd_evaluate(args) -> None:
    from dyhead.config import resolve

    run = resolve(args.experiment, args.profile)
    _launch(args, run)
    if args.split == "test-dev":  # no public labels: write the server's upload zip
        from dyhead.engine.testdev import predict_testdev

        predict_testdev(run, tta=args.tta, threads=args.threads, backend=args.dcn_backend)
    else:
        from dyhead.engine.evaluate import evaluate

        evaluate(run, tta=args.tta, threads=args.threads, backend=args.dcn_backend)


def cmd_diagnose(args) -> None:
    from dyhead.config import resolve
    from dyhead.engine.diagnose import diagnose

    diagnose(resolve(args.experiment, args.profile), init=args.init, images=args.images, threads=args.threads,
             backend=args.dcn_backend)


def cmd_fetch_coco(args) -> None:
    from dyhead.config import load_profile
    from dyhead.data.coco_fetch import fetch_coco

    profile = load_profile(args.profile)
    data = profile["data"]
    if data["source"] != "coco" and not args.root:
        raise DyheadError(f"profile {args.profile} reads {data['source']} data; use --profile coco (or --root DIR)")
    root = Path(args.root or data["root"])
    parts = args.parts.split(",") if args.parts else None
    fetch_coco(root, parts, mirror=args.mirror, from_dir=args.from_dir, copy=args.copy,
               keep_archives=args.keep_archives)
    if not args.root and not parts:  # the files the profile names must now exist
        for key in ("train_images", "val_images", "test_images", "train_annotations", "val_annotations",
                    "test_annotations"):
            if key in data and not Path(data[key]).exists():
                raise DyheadError(f"params/profiles/{args.profile}.yaml: data.{key}: {data[key]} is not in the "
                                  f"fetched layout under {root}")


def cmd_pretrain(args) -> None:
    from dyhead.config import PRETRAINED, embedded_standin, load_profile, pretrained_path, standin_key, standin_paths
    from dyhead.data.fetch import file_digest
    from dyhead.engine.pretrain import run_pretrain
    from dyhead.files import save_json

    profile = load_profile(args.profile)
    names = args.backbone or [k for k, bb in profile["model"]["backbones"].items() if bb.get("weights") == PRETRAINED]
    if not names:
        print(f"profile {args.profile}: no backbone has `weights: {PRETRAINED}`; name one to pretrain it anyway")
        return
    if args.out and len(names) > 1:
        raise DyheadError(f"--out {args.out}: one file cannot hold {len(names)} backbones ({', '.join(names)}); name one")
    if args.out and args.embed:
        raise DyheadError("--out and --embed name two places for one file; give one")
    for name in names:
        committed, manifest = standin_paths(args.profile, name)
        out = Path(args.out or (committed if args.embed else pretrained_path(args.profile, name)))
        summary = run_pretrain(args.profile, profile, name, out, threads=args.threads)
        if args.embed:  # the summary becomes the manifest that says under which settings the file is valid
            summary.update(key=standin_key(profile, name), sha256=file_digest(out, "sha256"))
            save_json(Path(manifest), summary)
            print(f"{committed}: committed stand-in for these settings; `git add {committed} {manifest}`")
        elif not args.out and embedded_standin(args.profile, profile, name):
            print(f"note: trainings under these settings start from the committed {committed}, not from {out} "
                  f"(--embed replaces that one)")


def cmd_fetch_weights(args) -> None:
    from dyhead.config import PRETRAINED, load_profile
    from dyhead.modeling.pretrained import IMAGENET, WEIGHTS_DIR, arch_of_file, fetch_weights

    wanted = {arch: Path(args.dir or WEIGHTS_DIR) for arch in args.arch}  # arch -> directory
    if not wanted:  # whatever the profile's backbones load, where the profile expects it
        profile = load_profile(args.profile)
        for key, bb in profile["model"]["backbones"].items():
            if bb.get("weights") and bb["weights"] != PRETRAINED:  # `dyhead pretrain` makes those
                arch = arch_of_file(bb["weights"])
                if arch is None:
                    known = ", ".join(r.name for r in IMAGENET.values())
                    raise DyheadError(f"params/profiles/{args.profile}.yaml: model.backbones.{key}.weights: "
                                      f"{bb['weights']} is not a file fetch-weights knows ({known})")
                wanted[arch] = Path(args.dir or Path(bb["weights"]).parent)
        if not wanted:
            print(f"profile {args.profile} loads no ImageNet weights; nothing to fetch")
            return
    for arch, directory in wanted.items():
        for path in fetch_weights([arch], directory, mirror=args.mirror, from_dir=args.from_dir):
            print(f"ready: {path}")


def cmd_standin_weights(args) -> None:
    from dyhead.config import load_profile
    from dyhead.modeling.pretrained import arch_of_standin, save_standin_weights

    wanted = {arch: Path(args.dir) for arch in args.arch}  # arch -> directory
    if not wanted:  # the stand-in files the profile's backbones name, where it names them
        profile = load_profile(args.profile)
        for key, bb in profile["model"]["backbones"].items():
            arch = arch_of_standin(bb.get("weights") or "")
            if arch is not None:
                wanted[arch] = Path(bb["weights"]).parent
        if not wanted:
            print(f"profile {args.profile} loads no stand-in weights; nothing to write")
            return
    for arch, directory in wanted.items():
        save_standin_weights(arch, directory)


def cmd_flops(args) -> None:
    from dyhead.config import resolve
    from dyhead.engine.flops import flops

    flops(resolve(args.experiment, args.profile), args.out)


def cmd_report(args) -> None:
    from dyhead.report.tables import report

    report(args.table, args.profile, args.out, seeds=args.seeds)


MODEL_FIGURES = ("fig3", "fig4", "detections")  # of one trained experiment
TABLE_FIGURES = ("curves", "gains", "convergence")  # of a table's runs


def cmd_figure(args) -> None:
    from dyhead.config import resolve

    out = Path(args.out) if args.out else None
    if args.images is not None and args.images < 1:
        raise DyheadError(f"--images {args.images}: must be at least 1")
    if args.name in TABLE_FIGURES:
        from dyhead.report import figures

        getattr(figures, args.name)(args.target, args.profile, out, seeds=args.seeds)
        return
    from dyhead.engine import visualize

    run = resolve(args.target, args.profile)
    if args.name == "fig3":
        visualize.figure3(run, out, images=args.images, threads=args.threads, backend=args.dcn_backend)
    elif args.name == "fig4":
        visualize.figure4(run, out, images=args.images or 4, threads=args.threads, backend=args.dcn_backend)
    else:
        visualize.detections(run, out, images=args.images or 4)


def cmd_results(args) -> None:
    from dyhead.config import load_matrix
    from dyhead.report.results import collect, write_results

    frame = collect(args.profile, load_matrix(profile=args.profile))
    out = write_results(frame, Path(args.out))
    print(f"wrote {out}: {len(frame)} runs of profile {args.profile}")


def cmd_list(args) -> None:
    from dyhead.config import load_matrix

    matrix = load_matrix(profile=args.profile)
    if args.grid:
        _list_grid(matrix, args.grid, args.profile)
        return
    from dyhead.config import resolve

    print(f"# experiments, how they train and the tables and grids they feed under profile {args.profile}")
    for exp in matrix.experiments:
        tables, grids = matrix.tables_of(exp), matrix.grids_of(exp)
        if tables or args.all:
            settings = _settings(resolve(exp, args.profile, matrix=matrix))
            print(f"{exp:42s} {settings:55s} tables: {','.join(tables) or '-'}"
                  + (f"  grids: {','.join(grids)}" if grids else ""))


def _list_grid(matrix, name: str, profile: str) -> None:
    """`dyhead list --grid NAME`: each cell's axis values, its experiment and the tables sharing it."""
    from dyhead.config import resolve
    from dyhead.grids import describe

    if name not in matrix.grids:
        raise DyheadError(f"unknown grid {name!r}; params/grids.yaml defines {', '.join(matrix.grids) or 'none'}")
    grid = matrix.grids[name]
    exps = matrix.table_experiments(f"grid_{name}")
    print(f"# grid {name}: {len(grid['cells'])} cells, {len(exps)} experiments (profile {profile}); "
          f"rows {','.join(grid['rows'])}, columns {','.join(grid['columns']) or '-'}")
    for cell in grid["cells"]:
        exp = cell["experiment"]
        tables = matrix.tables_of(exp)
        where = describe(cell["axes"], grid["varied"])
        print(f"{where:50s} {exp:42s} {_settings(resolve(exp, profile, matrix=matrix))}"
              + (f"  also in {','.join(tables)}" if tables else ""))


def _settings(run) -> str:
    """'lr 0.01, steps 60000/80000 of 90000, recipe official': how the experiment trains under its profile."""
    solver = run.profile["solver"]
    steps = "/".join(str(int(f * run.max_iter)) for f in solver["steps"])
    return f"lr {solver['base_lr']:g}, steps {steps} of {run.max_iter}, recipe {run.spec.get('recipe', 'paper')}"


def cmd_dvc_yaml(args) -> None:
    from dyhead.dvc_stages import render

    text, out = render(args.profile, args.tables, args.grids), Path(args.out)
    if args.check:
        if not out.exists() or out.read_text() != text:
            raise DyheadError(f"{out} is not what params/ gives; regenerate: dyhead dvc-yaml --profile {args.profile}")
        print(f"{out} is up to date")
        return
    from dyhead.files import save_text

    save_text(out, text)
    print(f"wrote {out} (profile {args.profile}): `dvc repro` runs it, `dvc push` stores the checkpoints")


def cmd_gpu_check(args) -> None:
    from dyhead.engine.distributed import gpu_report
    from dyhead.files import save_text

    text, count = gpu_report(args.expect)
    print(text, end="")
    if count != args.expect:
        raise DyheadError(f"gpu-check: this job sees {count} GPU(s), it asked for {args.expect}; "
                          "check the partition's GPUs and the slurm profile's gpu resource")
    save_text(Path(args.out), text)


def _data_commands(sub) -> None:
    """What every profile makes first: the synthetic data and the native extension."""
    p = sub.add_parser("synth", help="make the deterministic synthetic COCO-format data set of a profile")
    _profile_arg(p)
    p.set_defaults(func=cmd_synth)

    sub.add_parser("build-ext", help="compile the native deformable-conv extension (CPU; CUDA where nvcc is); "
                   "`dyhead build-ext --help` for its options", add_help=False)


def _run_commands(sub) -> None:
    """What runs an experiment: train, evaluate, diagnose."""
    p = sub.add_parser("train", help="train one experiment into runs/<profile>/<experiment>/ (resumes by itself)")
    p.add_argument("experiment", help="an id from params/experiments.yaml (`dyhead list`)")
    _profile_arg(p)
    _runtime_args(p)
    _launch_args(p)
    p.add_argument("--stop-at", type=int, help="stop after this iteration without finishing (for tests)")
    p.add_argument("--force", action="store_true",
                   help="train again even if model_final.pth exists (its results, e.g. metrics.json, are removed)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="predict on the validation set; write predictions.json and metrics.json")
    p.add_argument("experiment", help="an id from params/experiments.yaml (`dyhead list`)")
    _profile_arg(p)
    _runtime_args(p)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation (the profile's tta scales + flips): *_tta.json outputs")
    p.add_argument("--split", choices=["val", "test-dev"], default="val",
                   help="test-dev (coco profile): write detections_test-dev2017_<name>_results.zip for the COCO server")
    _launch_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("diagnose", help="per head stage: each loss's gradient and a linear class probe (why a "
                       "head learns boxes but not classes); writes diagnose.json beside the run")
    p.add_argument("experiment", help="an id from params/experiments.yaml (`dyhead list`)")
    _profile_arg(p)
    _runtime_args(p)
    p.add_argument("--init", action="store_true", help="the model as training starts it, not model_final.pth")
    p.add_argument("--images", type=int, default=256, help="training images to measure on (default 256)")
    p.set_defaults(func=cmd_diagnose)


def _fetch_commands(sub) -> None:
    """Data and weights from outside (COCO, ImageNet files), their check, and their stand-ins."""
    p = sub.add_parser("fetch-coco", help="download, verify and extract COCO 2017 (resumable; skipped once done)")
    _profile_arg(p)
    p.add_argument("--root", help="data root (default: the profile's data.root)")
    p.add_argument("--mirror", metavar="URL", help="base URL holding zips/ and annotations/ like images.cocodataset.org")
    p.add_argument("--from-dir", metavar="PATH", type=Path,
                   help="reuse a local copy: an extracted COCO layout (linked) or the official zips (verified)")
    p.add_argument("--copy", action="store_true", help="with --from-dir: copy instead of symlinking")
    p.add_argument("--parts", help="comma-separated subset of train,val,test,annotations,test-info (default: all)")
    p.add_argument("--keep-archives", action="store_true", help="keep the zips under <root>/archives/")
    p.set_defaults(func=cmd_fetch_coco)

    p = sub.add_parser("check-data", help="open every image of the profile's splits once (with progress): a missing "
                       "or broken file is named now, not when its batch comes")
    _profile_arg(p)
    p.add_argument("--split", choices=["train", "val", "all"], default="all")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("fetch-weights", help="download torchvision's ImageNet weights of the backbones into data/weights/")
    p.add_argument("arch", nargs="*", help="r50 | r101 | x101 (default: those the profile's backbones load)")
    _profile_arg(p)
    p.add_argument("--dir", help="output directory (default: data/weights)")
    p.add_argument("--mirror", metavar="URL", help="base URL in place of https://download.pytorch.org/models")
    p.add_argument("--from-dir", metavar="PATH", type=Path, help="copy the files from here (verified) instead")
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("standin-weights", help="write randomly initialised torchvision backbones (not ImageNet) "
                       "under the file names a profile loads (cocolike: no download)")
    p.add_argument("arch", nargs="*", help="r50 | r101 | x101 (default: the stand-ins the profile's backbones load)")
    _profile_arg(p)
    p.add_argument("--dir", default="data/weights/standin", help="output directory for named archs "
                   "(default: data/weights/standin)")
    p.set_defaults(func=cmd_standin_weights)

    p = sub.add_parser("pretrain", help="the ImageNet stand-in: pretrain backbones on object crops of the training split")
    p.add_argument("backbone", nargs="*", help="model.backbones keys (default: those with `weights: pretrained`)")
    _profile_arg(p)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the profile's runtime.threads)")
    p.add_argument("--out", help="output file (default: data/weights/<profile>/<backbone>.pth, where training looks "
                                 "unless a committed stand-in matches the settings)")
    p.add_argument("--embed", action="store_true",
                   help="write data/standins/<profile>/<backbone>.pth and its manifest, to commit: trainings under "
                        "these exact settings (and this pretrain code) then start from it without pretraining")
    p.set_defaults(func=cmd_pretrain)


def _output_commands(sub) -> None:
    """What reads finished runs: FLOPs, reports, figures, results."""
    p = sub.add_parser("flops", help="count GMACs of the coco-profile model at 800x1344 and of the profile's model")
    p.add_argument("experiment", help="an id from params/experiments.yaml (`dyhead list`)")
    _profile_arg(p)
    p.add_argument("--out", help="output JSON (default: runs/<profile>/<experiment>/flops.json)")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("report", help="write reports/<table>.md and .csv (and reports/results.csv, every run of the "
                       "profile) from the runs' metrics and FLOPs")
    p.add_argument("table", help="table1 | table2 | ... (params/tables.yaml) | grid_<name> (params/grids.yaml)")
    _profile_arg(p)
    _seeds_arg(p)
    p.add_argument("--out", help="output file (default: reports/<table>.md; the .csv beside it)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("figure", help="draw a figure into reports/figures/: fig3 | fig4 | detections of a trained "
                       "experiment, curves | gains | convergence of a table (each also logged to MLflow)")
    p.add_argument("name", choices=MODEL_FIGURES + TABLE_FIGURES)
    p.add_argument("target", help="an experiment id (fig3, fig4, detections) or a table (curves, gains)")
    _profile_arg(p)
    _runtime_args(p)
    p.add_argument("--images", type=int, help="val images to use (fig3: all; fig4 and detections: 4)")
    _seeds_arg(p)
    p.add_argument("--out", help="output PNG (default: reports/figures/<name>_<target>.png)")
    p.set_defaults(func=cmd_figure)

    p = sub.add_parser("results", help="write every run of a profile, one row each, to reports/results.csv")
    _profile_arg(p)
    p.add_argument("--out", default="reports/results.csv", help="output CSV (default: reports/results.csv)")
    p.set_defaults(func=cmd_results)


def _orchestration_commands(sub) -> None:
    """What the orchestrators and operators call: list, dvc-yaml, gpu-check."""
    p = sub.add_parser("list", help="list the experiments a profile's tables train, and the tables each feeds")
    _profile_arg(p)
    p.add_argument("--all", action="store_true", help="also the experiments no table of this profile uses")
    p.add_argument("--grid", metavar="NAME", help="the cells of a grid of params/grids.yaml and their experiments")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("dvc-yaml", help="write dvc.yaml: the tables' and grids' experiments as DVC stages (same commands)")
    _profile_arg(p)
    p.add_argument("--tables", nargs="+", help="only these tables (default: all in params/tables.yaml)")
    p.add_argument("--grids", nargs="+", help="only these grids (default: all in params/grids.yaml; none when "
                   "--tables is given alone)")
    p.add_argument("--out", default="dvc.yaml", help="output file (default: dvc.yaml)")
    p.add_argument("--check", action="store_true", help="fail if the file differs from what params/ gives")
    p.set_defaults(func=cmd_dvc_yaml)

    p = sub.add_parser("gpu-check", help="write what GPUs this job sees; fail unless their count is --expect")
    p.add_argument("--expect", type=int, required=True, help="the GPUs the job asked for")
    p.add_argument("--out", required=True, help="report file, written only when the count matches")
    p.set_defaults(func=cmd_gpu_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dyhead",
        description="Dynamic Head experiment pipeline. Each subcommand is one step of the Snakemake DAG: "
                    "synth (+ pretrain or standin-weights) | fetch-coco (+ fetch-weights) -> build-ext -> train -> evaluate -> flops -> report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _data_commands(sub)
    _run_commands(sub)
    _fetch_commands(sub)
    _output_commands(sub)
    _orchestration_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["build-ext"]:  # its own parser (dyhead.ops.build) takes the rest verbatim
        from dyhead.ops import build

        return build.main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv  # train and evaluate re-run themselves under torchrun with these
    try:
        args.func(args)
    except DyheadError as exc:
        print(f"dyhead: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dyhead: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dyhead list | head`: the reader left; silence the flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the disk, the filesystem, permissions: one line naming the file
        from dyhead.files import os_error

        print(f"dyhead: error: {os_error(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
