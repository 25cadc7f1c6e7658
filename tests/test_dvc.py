"""dvc.yaml: generated from params/, the same experiments and commands as the Snakefile, params
tracked per experiment, and a real `dvc repro` / push / pull round trip in a fresh git repository."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import REPO, dvc, dvc_stages, dyhead, snakemake, snakemake_commands


def test_dvc_yaml_is_what_params_give():
    """The committed dvc.yaml is the generator's output for the default profile (regenerate with
    `dyhead dvc-yaml` after editing params/experiments.yaml or params/tables.yaml)."""
    proc = subprocess.run([sys.executable, "-m", "dyhead.cli", "dvc-yaml", "--check"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("profile", ["mini", "coco"])
def test_snakemake_and_dvc_run_the_same_experiments_with_the_same_commands(dvc_repo, profile):
    """The committed dvc.yaml (mini), and one generated for coco, against Snakemake's full dry run."""
    if profile == "mini":
        shutil.copy(REPO / "dvc.yaml", dvc_repo / "dvc.yaml")
    else:
        dyhead("dvc-yaml", "--profile", profile, cwd=dvc_repo)
    import dyhead.config as config

    matrix = config.load_matrix(REPO, profile)  # mini's Table 3 trains 3x (profile_schedule)
    dvc_view = dvc_stages(dvc_repo)
    # DVC holds every table (but the on-demand ones) and grid; Snakemake's `all` the tables, the grids are targets
    # of their own
    smk_view = snakemake_commands(dvc_repo, profile, ["all"] + [f"reports/grid_{g}.md" for g in matrix.grids])
    assert sorted(dvc_view) == sorted(smk_view)
    for name, cmd in smk_view.items():
        assert dvc_view[name] == cmd, name
    trained = {n.split("@")[1] for n in dvc_view if n.startswith("train@")}
    built = matrix.default_tables + [f"grid_{g}" for g in matrix.grids]
    assert trained == {e for t in built for e in matrix.table_experiments(t)}
    assert "report-convergence" not in dvc_view
    assert {"report-grid_paper", "report-grid_quick"} <= set(dvc_view)


def test_every_experiment_stage_tracks_the_params_key_that_defines_it():
    """An experiment of params/experiments.yaml tracks its entry; one a profile_schedule retrains, the entry it
    retrains (mini's 3x Table 3); one only a grid names, its detector's detector_defaults (its id says the rest)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    items = stages["train"]["foreach"]
    assert stages["train"]["do"]["params"][0] == {"params/experiments.yaml": ["${item.params}"]}
    assert items["atss-r50-base-1x"]["params"] == "experiments.atss-r50-base-1x"
    assert items["fcos-r50-dyh6-LSC-3x"]["params"] == "experiments.fcos-r50-dyh6-LSC-1x"
    assert items["fcos-r101-dyh6-LSC-1x"]["params"] == "detector_defaults.fcos"
    experiments = yaml.safe_load((REPO / "params/experiments.yaml").read_text())
    for item in items.values():  # every key exists, or `dvc repro` stops on it
        node = experiments
        for part in item["params"].split("."):
            node = node[part]
    assert stages["report-grid_quick"]["params"][0] == {"params/grids.yaml": ["grids.quick"]}
    assert {"reports/grid_quick.csv": {"cache": False}} in stages["report-grid_quick"]["outs"]


def _fake_outputs(root: Path) -> None:
    """Every stage's outputs as placeholder files, so `dvc commit` records a lock without running."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                path = Path(out.fs_path)
                if stage.addressing == "synth":
                    path = path / "synth.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(stage.addressing)


def _changed(root: Path) -> set[str]:
    return set(json.loads(dvc("status", "--json", cwd=root).stdout or "{}"))


def _edit_yaml(path: Path, edit) -> str:
    before = path.read_text()
    data = yaml.safe_load(before)
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return before


@pytest.mark.slow
def test_a_changed_hyperparameter_reruns_exactly_the_experiments_it_touches(dvc_repo):
    root = dvc_repo
    dyhead("dvc-yaml", "--profile", "tiny", cwd=root)
    _fake_outputs(root)
    dvc("commit", "-f", "-q", cwd=root)
    assert _changed(root) == set()
    matrix = __import__("dyhead.config", fromlist=["load_matrix"]).load_matrix(root, "tiny")
    built = matrix.default_tables + [f"grid_{g}" for g in matrix.grids]  # on-demand tables are not in dvc.yaml
    ids = {e for t in built for e in matrix.table_experiments(t)}
    tta = {r["experiment"] for t in matrix.tables.values() for r in t["rows"] if r.get("tta")}
    reports = {f"report-{t}" for t in built}  # a report reads the whole profile: cheap, always redone
    profile = root / "params/profiles/tiny.yaml"

    stages = set(dvc_stages(root))

    def experiment_stages(exps, kinds=("train", "evaluate")):
        return ({f"{k}@{e}" for e in exps for k in kinds} | {f"evaluate_tta@{e}" for e in exps & tta}) & stages

    # the 2x schedule length: the 2x experiments, nothing else
    two_x = {e for e in ids if matrix.experiments[e]["schedule"] == "2x"}
    assert two_x and two_x != ids
    before = _edit_yaml(profile, lambda p: p["solver"]["schedules"].update({"2x": 9}))
    assert _changed(root) == experiment_stages(two_x) | reports
    profile.write_text(before)

    # one backbone's settings: its experiments (and their FLOPs), nothing else
    r101 = {e for e in ids if matrix.experiments[e]["backbone"] == "r101"}
    before = _edit_yaml(profile, lambda p: p["model"]["backbones"]["r101"].update({"base_width": 12}))
    assert _changed(root) == experiment_stages(r101, ("train", "evaluate", "flops")) | reports
    profile.write_text(before)

    # the logging period changes no weights: no experiment re-runs
    before = _edit_yaml(profile, lambda p: p["solver"].update({"log_period": 3}))
    assert _changed(root) == reports
    profile.write_text(before)

    # RetinaNet's defaults for experiments only a grid names: those, nothing else
    grid_retinanet = {e for e in ids if matrix.param_keys[e] == "detector_defaults.retinanet"}
    assert grid_retinanet
    experiments = root / "params/experiments.yaml"
    before = _edit_yaml(experiments, lambda x: x["detector_defaults"]["retinanet"]["solver"].update({"lr_scale": 0.4}))
    assert _changed(root) == experiment_stages(grid_retinanet, ("train", "evaluate", "flops"))
    experiments.write_text(before)

    # a grid's layout: its report alone
    grids = root / "params/grids.yaml"
    before = _edit_yaml(grids, lambda g: g["grids"]["quick"].update({"title": "other"}))
    assert _changed(root) == {"report-grid_quick"}
    grids.write_text(before)

    # a paper number of Table 1: its report alone
    tables = root / "params/tables.yaml"
    _edit_yaml(tables, lambda t: t["table1"]["rows"][0]["paper"].update({"AP": 1.0}))
    assert _changed(root) == {"report-table1"}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_repro_push_pull_and_nothing_left_to_do(dvc_repo, monkeypatch):
    """Tiny Tables 1-2: `dvc repro` runs every stage, `dvc push` stores the checkpoints in the
    default remote beside the repository, `dvc pull` brings deleted ones back, and a second
    `dvc repro` finds nothing to do. The DVC view equals Snakemake's for the same targets."""
    monkeypatch.setenv("DYHEAD_TRACKING", "off")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # the stages call `dyhead`
    root = dvc_repo
    dyhead("dvc-yaml", "--profile", "tiny", "--tables", "table1", "table2", cwd=root)
    smk_view = snakemake_commands(root, "tiny", ["reports/table1.md", "reports/table2.md"])
    assert dvc_stages(root) == smk_view

    dvc("repro", cwd=root)
    runs = sorted((root / "runs/tiny").glob("*/model_final.pth"))
    assert len(runs) == len([n for n in smk_view if n.startswith("train@")]) > 10
    assert (root / "reports/table1.md").exists() and (root / "reports/table2.md").exists()
    assert "runs/tiny/atss-r50-base-1x/metrics.json" in dvc("metrics", "show", cwd=root).stdout

    dvc("push", cwd=root)
    remote = root.parent / "dyhead-dvc-remote"
    assert remote.is_dir() and any(remote.rglob("*"))
    digests = {p: _md5(p) for p in runs}
    for p in runs:
        p.unlink()
    dvc("pull", cwd=root)
    assert {p: _md5(p) for p in runs} == digests

    again = dvc("repro", cwd=root)
    assert "Running stage" not in again.stdout, again.stdout
    assert _changed(root) == set()


@pytest.mark.slow
def test_a_dvc_training_stage_on_two_processes_gives_snakemakes_weights(dvc_repo, monkeypatch):
    """`dvc repro train@<exp>` runs the launcher Snakemake's train job runs (`--processes auto`); with
    DYHEAD_PROCESSES=2 both train on 2 gloo processes on this CPU machine and end with the same weights."""
    monkeypatch.setenv("DYHEAD_TRACKING", "off")
    monkeypatch.setenv("DYHEAD_PROCESSES", "2")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # the stages call `dyhead`
    root, exp = dvc_repo, "atss-r50-dyh1-LSC-1x"
    stage, target = f"train@{exp}", f"runs/tiny/{exp}/model_final.pth"
    dyhead("dvc-yaml", "--profile", "tiny", "--tables", "table2", cwd=root)
    command = dvc_stages(root)[stage]
    assert command == snakemake_commands(root, "tiny", [target])[stage] and command.endswith(" --processes auto")

    snakemake(target, "--cores", "2", "--config", "profile=tiny", cwd=root)
    run = root / "runs/tiny" / exp
    by_snakemake = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert json.loads((run / "train.json").read_text())["world_size"] == 2
    shutil.rmtree(run)  # checkpoints too: the DVC stage trains from scratch, not from Snakemake's last one

    out = dvc("repro", stage, cwd=root).stdout
    assert f"Running stage '{stage}'" in out and "--nproc-per-node 2" in out
    assert json.loads((run / "train.json").read_text())["world_size"] == 2
    by_dvc = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert by_dvc.keys() == by_snakemake.keys()
    assert all(torch.equal(by_dvc[k], by_snakemake[k]) for k in by_dvc)
