"""What the test modules share: running the project's commands as a user does, and reading their output.

Test modules import from here (and fixtures come from conftest.py), never from each other.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*cmd, cwd, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """A command in `cwd`; with `check`, a failure raises with the end of its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed (rc {proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dyhead(*args, cwd, check: bool = True, nproc: int = 1, **kw) -> subprocess.CompletedProcess:
    """`dyhead ARGS`, or the same under `torchrun --standalone --nproc_per_node N`."""
    launch = [sys.executable, "-m", "dyhead.cli"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                  "-m", "dyhead.cli"]
    return run(*launch, *args, cwd=cwd, check=check, **kw)


def snakemake(*args, cwd, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "snakemake", *args, cwd=cwd, check=check, **kw)


def dvc(*args, cwd, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check, **kw)


def dry_run_jobs(text: str) -> list[dict]:
    """The job blocks of `snakemake -n -p`: rule, input, wildcards, resources, shell command."""
    jobs, job = [], None
    for line in text.splitlines():
        if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
            job = {"rule": line.split()[1].rstrip(":"), "input": "", "wildcards": "", "resources": {}, "shell": ""}
            jobs.append(job)
        elif job is not None and line.startswith("    input: "):
            job["input"] = line.split(": ", 1)[1]
        elif job is not None and line.startswith("    wildcards: "):
            job["wildcards"] = line.split(": ", 1)[1]
        elif job is not None and line.startswith("    resources: "):
            job["resources"] = dict(kv.split("=", 1) for kv in line.split(": ", 1)[1].split(", "))
        elif job is not None and line.startswith("Shell command: "):
            job["shell"] = line.removeprefix("Shell command: ")
    return jobs


def dvc_stages(root: Path) -> dict[str, str]:
    """Stage name -> command, as DVC itself expands dvc.yaml (foreach included)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.addressing: stage.cmd for stage in repo.index.stages}


# Figures are views of the runs drawn by Snakemake (workflow/rules/figures.smk); dvc.yaml versions the data,
# models, metrics and tables only, so a dry run's figure jobs have no DVC stage to match.
FIGURE_RULES = ("fig3", "fig4", "detections", "curves", "gains", "figures", "convergence_figure", "convergence")


def snakemake_commands(root: Path, profile: str, targets: list[str]) -> dict[str, str]:
    """Job -> command of a full dry run, named as dvc.yaml names its stages; without `2>&1 | tee log`."""
    # --cores: a dry run otherwise caps every job's threads at 1
    proc = snakemake(*targets, "-n", "-p", "-F", "--cores", "1024", "--config", f"profile={profile}", cwd=root)
    names = {}
    for job in dry_run_jobs(proc.stdout + proc.stderr):
        if job["rule"] in ("all",) + FIGURE_RULES:
            continue
        wildcards = dict(w.split("=", 1) for w in job["wildcards"].split(", ") if w)
        if job["rule"] == "report":
            name = f"report-{wildcards['table']}"
        elif "exp" in wildcards:
            name = f"{job['rule']}@{wildcards['exp']}"
        elif job["rule"] == "fetch_weights":
            name = f"fetch_weights@{wildcards['file']}"
        elif job["rule"] == "pretrain":
            name = f"pretrain@{wildcards['backbone']}"
        else:
            name = job["rule"]
        names[name] = re.sub(r"\s+", " ", re.sub(r" 2>&1 \| tee \S+$", "", job["shell"])).strip()
    return names


def write_fake_run(root: Path, profile: str, exp: str, ap: float, gmacs: float | None = 200.0, tta: bool = False,
                   min_size=128, base_lr: float = 0.02, iterations: int = 1000, spec: dict | None = None,
                   machines: list[str] | None = None) -> Path:
    """runs/<profile>/<exp>/{metrics,train,flops}.json as the pipeline writes them, with made-up numbers
    (AP50 = AP + 20, AP75 = AP + 2, APs/APm/APl = AP - 10 / AP / AP + 5); `tta` writes metrics_tta.json instead
    of metrics.json. For reports built without training."""
    from dyhead.files import save_json

    run = root / "runs" / profile / exp
    metrics = {"AP": ap, "AP50": ap + 20, "AP75": ap + 2, "APs": ap - 10, "APm": ap, "APl": ap + 5}
    record = {"experiment": exp, "profile": profile, "annotations": "data/synthetic/annotations/instances_val.json",
              "images": 1000, "eval_seconds": 12.0, "metrics": metrics}
    if tta:
        record["tta"] = {"scales": [128, 96, 192], "flip": True, "size_ranges": None, "nms_thresh": 0.6,
                         "detections_per_img": 100}
    save_json(run / ("metrics_tta.json" if tta else "metrics.json"), record)
    spec = spec or {"detector": "atss", "backbone": "r50", "schedule": "1x", "head": {"blocks": 0}}
    train = {
        "experiment": exp, "profile": profile, "iterations": iterations, "train_seconds": 321.5, "parameters": 1000,
        "peak_rss_mb": 500.0, "config": {"experiment": exp, "spec": spec, "profile_settings": {
            "solver": {"base_lr": base_lr, "batch_size": 8, "steps": [0.67, 0.89]},
            "input": {"min_size_train": min_size}}}}
    if machines is not None:
        train["machines"] = machines
    save_json(run / "train.json", train)
    if gmacs is not None:
        save_json(run / "flops.json", {"experiment": exp, "convention": "multiply-adds",
                                       profile: {"gmacs": gmacs / 100}, "coco": {"gmacs": gmacs}})
    return run


# Kills injected by tests/test_faults.py: {"step", "at_seconds", "landed"}; conftest prints the tally.
FAULTS: list[dict] = []
