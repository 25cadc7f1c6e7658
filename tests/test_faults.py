"""Fault injection: kills at random points of every step, torn and hostile files, a full disk, permissions
and hostile configuration. Whatever happens, a rerun of the same command ends with the results of an
uninterrupted run, nothing is left behind, and every error is one line.

The kills are tallied (see `FAULTS` in tests/helpers.py); pytest prints the tally at the end of the run.
"""
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import FAULTS, dyhead, snakemake

EXP = "atss-r50-dyh1-LSC-1x"
RNG = random.Random(14)  # the kill times are random but the same in every CI run


def scratch_profile(root: Path, name: str, **solver) -> None:
    """The tiny profile with solver overrides, as params/profiles/<name>.yaml."""
    prof = yaml.safe_load((root / "params/profiles/tiny.yaml").read_text())
    prof["solver"].update(solver)
    (root / f"params/profiles/{name}.yaml").write_text(yaml.safe_dump(prof))


def leftovers(root: Path) -> list[Path]:
    """Temporary files of interrupted writes anywhere in the checkout."""
    return [p for p in root.rglob("*.tmp") if ".snakemake" not in p.parts]


def one_line_error(proc) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert err.startswith("dyhead: error: ") and "\n" not in err, err
    assert "Traceback" not in proc.stdout + proc.stderr
    return err


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def kill_at_random(cmd, cwd, seconds: float, step: str, **popen) -> None:
    """Start `cmd`, SIGKILL it after a random time in (0.1, 0.9) x `seconds` (or when it ends first)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    at = RNG.uniform(0.1, 0.9) * seconds
    try:
        proc.wait(timeout=at)
        FAULTS.append({"step": step, "at_seconds": round(at, 2), "landed": False})
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        FAULTS.append({"step": step, "at_seconds": round(at, 2), "landed": True})


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


@pytest.fixture
def tiny(repo_copy):
    dyhead("synth", "--profile", "tiny", cwd=repo_copy)
    return repo_copy


# -- 1. files from outside never run code ------------------------------------------------------------------


class _Payload:
    """Unpickling this runs `Path.touch(marker)`: what a hostile checkpoint on a shared remote would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_carries_code_is_refused_and_runs_nothing(tiny):
    marker = tiny / "PWNED"
    run = tiny / "runs/tiny" / EXP
    run.mkdir(parents=True)
    torch.save({"model": {}, "category_ids": [1, 2, 3], "evil": _Payload(str(marker))}, run / "model_final.pth")
    err = one_line_error(dyhead("evaluate", EXP, "--profile", "tiny", cwd=tiny, check=False))
    assert "refused to load" in err and "model_final.pth" in err
    (run / "checkpoints").mkdir()
    shutil.move(run / "model_final.pth", run / "checkpoints/last.pth")  # the same file as a resume point
    err = one_line_error(dyhead("train", EXP, "--profile", "tiny", cwd=tiny, check=False))
    assert "refused to load" in err and "last.pth" in err
    assert not marker.exists(), "loading the file ran its code"
    with pytest.raises(pickle.UnpicklingError):  # the same file does run code through plain pickle
        torch.load(run / "checkpoints/last.pth", weights_only=True)


# -- 2. a torn log line, a torn checkpoint -------------------------------------------------------------------


def test_a_torn_log_line_does_not_block_the_resume(tiny):
    scratch_profile(tiny, "torn", schedules={"1x": 8, "2x": 16, "3x": 24}, checkpoint_period=4, log_period=1)
    args = ("train", EXP, "--profile", "torn", "--dcn-backend", "torchvision")
    dyhead(*args, "--stop-at", "6", cwd=tiny)  # a checkpoint at 4, log lines up to 6
    log = tiny / "runs/torn" / EXP / "log.jsonl"
    with open(log, "a") as fh:
        fh.write('{"iteration": 7, "lr": 0.0')  # a kill in the middle of a line
    assert "resuming from" in dyhead(*args, cwd=tiny).stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 9))


def test_a_torn_checkpoint_is_one_line_that_says_what_to_do(tiny):
    scratch_profile(tiny, "tornckpt", schedules={"1x": 8, "2x": 16, "3x": 24}, checkpoint_period=4)
    args = ("train", EXP, "--profile", "tornckpt", "--dcn-backend", "torchvision")
    dyhead(*args, "--stop-at", "4", cwd=tiny)
    ckpt = tiny / "runs/tornckpt" / EXP / "checkpoints/last.pth"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    err = one_line_error(dyhead(*args, cwd=tiny, check=False))
    assert "last.pth" in err and "restart the training from iteration 0" in err


# -- 3, 4, 6. kills at random points: train, evaluate, report, Snakemake ---------------------------------------


@pytest.mark.slow
def test_train_evaluate_report_killed_at_random_points_end_as_if_never_killed(tiny):
    scratch_profile(tiny, "kill", schedules={"1x": 40, "2x": 80, "3x": 120}, checkpoint_period=4, log_period=2)
    train = [sys.executable, "-m", "dyhead.cli", "train", EXP, "--profile", "kill"]
    evaluate = [sys.executable, "-m", "dyhead.cli", "evaluate", EXP, "--profile", "kill"]
    run = tiny / "runs/kill" / EXP
    _, train_s = timed(lambda: dyhead(*train[3:], cwd=tiny))
    _, eval_s = timed(lambda: dyhead(*evaluate[3:], cwd=tiny))
    reference = {"weights": state(run / "model_final.pth"), "predictions": (run / "predictions.json").read_text(),
                 "metrics": json.loads((run / "metrics.json").read_text())["metrics"]}
    shutil.rmtree(run)

    for _ in range(3):
        kill_at_random(train, tiny, train_s, "train")
    dyhead(*train[3:], cwd=tiny)
    weights = state(run / "model_final.pth")
    assert all(torch.equal(weights[k], reference["weights"][k]) for k in reference["weights"])
    assert [json.loads(line)["iteration"] for line in (run / "log.jsonl").read_text().splitlines()] == \
        list(range(2, 41, 2))
    for _ in range(2):
        kill_at_random(evaluate, tiny, eval_s, "evaluate")
    dyhead(*evaluate[3:], cwd=tiny)
    assert (run / "predictions.json").read_text() == reference["predictions"]
    assert json.loads((run / "metrics.json").read_text())["metrics"] == reference["metrics"]
    assert not (run / "checkpoints/last.pth").exists()
    assert leftovers(tiny) == []


@pytest.mark.slow
def test_a_killed_snakemake_run_finishes_with_the_uninterrupted_tables(tiny):
    """kill -9 of Snakemake itself: its jobs go on as orphans and its lock stays. The README's recipe
    (`snakemake --unlock`, then the same command) ends with the tables of an uninterrupted run, and every
    MLflow run keeps its FLOPs and AP."""
    cmd = ["--cores", "2", "reports/table2.md", "--config", "profile=tiny"]
    _, full_s = timed(lambda: snakemake(*cmd, cwd=tiny))
    reference = (tiny / "reports/table2.md").read_text()
    shutil.rmtree(tiny / "runs")
    (tiny / "reports/table2.md").unlink()
    for name in ("mlflow.db",):
        (tiny / name).unlink(missing_ok=True)

    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *cmd], cwd=tiny, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    at = RNG.uniform(0.3, 0.7) * full_s
    time.sleep(at)
    os.kill(proc.pid, signal.SIGKILL)  # Snakemake alone: its jobs are left running
    proc.wait()
    FAULTS.append({"step": "snakemake", "at_seconds": round(at, 2), "landed": True})
    try:
        locked = snakemake(*cmd, cwd=tiny, check=False)
        assert locked.returncode != 0 and "unlock" in (locked.stdout + locked.stderr).lower()
        snakemake("--unlock", *cmd, cwd=tiny)
        snakemake(*cmd, cwd=tiny)
    finally:
        try:  # the orphans of the killed run, if any are still going
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert (tiny / "reports/table2.md").read_text() == reference
    assert leftovers(tiny) == []
    assert not list((tiny / "runs/tiny").glob("*/checkpoints/last.pth"))

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tiny / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dyhead-tiny")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    assert len(runs) == 8
    for r in runs:
        assert "gmacs_coco" in r.data.metrics and "AP" in r.data.metrics, r.data.tags["experiment"]


# -- 5. permissions: outputs follow the umask ---------------------------------------------------------------


def test_every_output_follows_the_umask(tiny):
    def umask_022():
        os.umask(0o022)

    for step in (("train", EXP), ("evaluate", EXP), ("flops", EXP)):
        proc = subprocess.run([sys.executable, "-m", "dyhead.cli", *step, "--profile", "tiny"], cwd=tiny,
                              preexec_fn=umask_022, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    run = tiny / "runs/tiny" / EXP
    files = [p for p in run.rglob("*") if p.is_file() and p.name != ".train.lock"]
    assert {p.name for p in files} >= {"model_final.pth", "train.json", "log.jsonl", "metrics.json",
                                       "predictions.json", "flops.json"}
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode & 0o777))


# -- 7. faults end in one line -------------------------------------------------------------------------------


def test_runs_being_a_file_is_one_line(tiny):
    (tiny / "runs").write_text("not a directory")
    err = one_line_error(dyhead("train", EXP, "--profile", "tiny", cwd=tiny, check=False))
    assert "runs" in err


def test_bad_thread_and_iteration_counts_are_one_line(tiny):
    assert "--threads -2" in one_line_error(dyhead("train", EXP, "--profile", "tiny", "--threads", "-2",
                                                   cwd=tiny, check=False))
    assert "--stop-at -1" in one_line_error(dyhead("train", EXP, "--profile", "tiny", "--stop-at", "-1",
                                                   cwd=tiny, check=False))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tiny):
    disk = tiny / "small-disk"
    if not _mount_tmpfs(disk, "600k"):
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN) to fill a disk")
    try:
        (tiny / "runs").mkdir(exist_ok=True)
        os.symlink(disk, tiny / "runs/tiny")
        err = one_line_error(dyhead("train", EXP, "--profile", "tiny", cwd=tiny, check=False))
        assert "no space left" in err or "writing failed" in err
        assert leftovers(disk) == [] and not list(disk.rglob("model_final.pth"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# -- 8. configuration values reach shell commands quoted ------------------------------------------------------


def test_a_hostile_config_value_stays_one_argument(tiny):
    marker = tiny / "PWNED"
    hostile = f"/tmp/a dir; touch {marker}"
    proc = snakemake("--cores", "1", "data/coco/fetch.json", "--config", "profile=coco", f"coco_from_dir={hostile}",
                     cwd=tiny, check=False)
    assert proc.returncode != 0  # the folder does not exist: the fetch fails, and nothing else runs
    assert not marker.exists(), "a ';' in a config value started a second command"
    out = proc.stdout + proc.stderr
    assert f"--from-dir '{hostile}'" in out


# -- 9. a finished experiment, stale results ------------------------------------------------------------------


def test_training_a_finished_experiment_again(tiny):
    args = ("train", EXP, "--profile", "tiny", "--dcn-backend", "torchvision")
    dyhead(*args, cwd=tiny)
    dyhead("evaluate", EXP, "--profile", "tiny", cwd=tiny)
    run = tiny / "runs/tiny" / EXP
    assert "nothing to do" in dyhead(*args, cwd=tiny).stdout  # same settings: nothing runs again
    prof = yaml.safe_load((tiny / "params/profiles/tiny.yaml").read_text())
    prof["solver"]["base_lr"] = 0.02
    (tiny / "params/profiles/tiny.yaml").write_text(yaml.safe_dump(prof))
    err = one_line_error(dyhead(*args, cwd=tiny, check=False))
    assert "--force" in err and (run / "metrics.json").exists()  # refused: nothing touched
    out = dyhead(*args, "--force", cwd=tiny)
    assert "removed the previous model's" in out.stdout
    assert not (run / "metrics.json").exists() and not (run / "predictions.json").exists()
    assert (run / "model_final.pth").exists()


def test_dropped_boxes_are_counted_and_broken_images_found_before_training(tiny):
    ann = tiny / "data/synthetic-tiny/annotations/instances_train.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"][2] = -5.0  # a box of negative width
    ann.write_text(json.dumps(data))
    proc = dyhead("train", EXP, "--profile", "tiny", "--stop-at", "1", cwd=tiny)
    assert "dyhead: warning:" in proc.stderr and "1 of" in proc.stderr and "boxes ignored" in proc.stderr
    image = tiny / "data/synthetic-tiny/val" / json.loads(
        (tiny / "data/synthetic-tiny/annotations/instances_val.json").read_text())["images"][3]["file_name"]
    image.write_bytes(image.read_bytes()[:100])
    err = one_line_error(dyhead("check-data", "--profile", "tiny", cwd=tiny, check=False))
    assert image.name in err and "cannot decode" in err


def test_a_symbolic_link_in_an_archive_is_refused(tmp_path):
    import zipfile

    from dyhead.data.fetch import extract_zip
    from dyhead.errors import DyheadError

    archive = tmp_path / "annotations.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("annotations/instances_val2017.json", "{}")
        link = zipfile.ZipInfo("annotations/evil")
        link.external_attr = (0o120777 << 16)  # a symlink member pointing outside
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(DyheadError, match="refusing to extract the symbolic link member 'annotations/evil'"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "annotations").exists()


def test_long_quiet_steps_say_what_they_do(tiny):
    out = dyhead("flops", EXP, "--profile", "tiny", cwd=tiny).stdout
    assert out.splitlines()[0].startswith(f"[{EXP}] counting multiply-adds")  # before the ~30 s of counting
    prof = yaml.safe_load((tiny / "params/profiles/tiny.yaml").read_text())
    prof["model"]["backbones"]["r50"]["weights"] = "pretrained"
    (tiny / "params/profiles/tiny.yaml").write_text(yaml.safe_dump(prof))
    out = dyhead("pretrain", "r50", "--profile", "tiny", cwd=tiny).stdout
    assert "loading annotations" not in out and "creating index" not in out  # no pycocotools chatter
