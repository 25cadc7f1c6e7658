"""MLflow tracking against a real SQLite store: one run per experiment and profile, resume, many
writers at once, optional when MLflow is missing or unreachable, and the runs in `mlflow ui`."""
import json
from dataclasses import replace
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from dyhead.config import resolve
from dyhead.engine import tracking
from dyhead.engine.tracking import NullTracker, Tracker, flat_params
from tests.helpers import dyhead, snakemake

EXP = "atss-r50-dyh1-LSC-1x"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def store(repo_copy, monkeypatch):
    """The default store of a scratch repository (sqlite:///<root>/mlflow.db), no telemetry."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DYHEAD_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setattr(tracking, "_warned", False)
    return repo_copy


def client_for(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def active_runs(root: Path, profile: str) -> list:
    client = client_for(root)
    exp = client.get_experiment_by_name(f"dyhead-{profile}")
    return client.search_runs([exp.experiment_id]) if exp else []


def set_profile(root: Path, name: str, **solver) -> None:
    prof = yaml.safe_load((root / "params/profiles/tiny.yaml").read_text())
    prof["solver"].update(solver)
    (root / f"params/profiles/{name}.yaml").write_text(yaml.safe_dump(prof))


def test_flat_params():
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


def test_one_run_per_experiment_and_profile(store):
    run = resolve(EXP, "tiny", store)
    t = Tracker.for_run(run, stage="train", tags={"dcn_backend": "torchvision"})
    t.log_params(flat_params(run.to_dict()))
    for step in (1, 2, 3):
        t.log_metrics({"loss": 3.0 - step, "lr": 0.01 * step}, step)
    (store / "train.json").write_text("{}")
    t.log_artifact(store / "train.json")
    t.finish("FINISHED")

    (only,) = active_runs(store, "tiny")
    assert only.info.run_id == t.run_id and only.info.run_name == EXP and only.info.status == "FINISHED"
    tags = only.data.tags
    assert tags["run_key"] == f"tiny/{EXP}" and tags["profile"] == "tiny" and tags["tables"] == "table2"
    assert tags["dcn_backend"] == "torchvision" and tags["git_commit"]  # "unknown" outside a git checkout
    assert only.data.params["spec.head.blocks"] == "1" and only.data.params["profile_settings.solver.base_lr"]
    art = store / "mlartifacts" / "dyhead-tiny" / t.run_id / "artifacts" / "train.json"
    assert art.exists(), "artifacts go to <repo>/mlartifacts, not the cwd's mlruns/"

    # a resume continues the run, skipping the steps it had logged before the kill
    resumed = Tracker.for_run(run, stage="train", resumed=True)
    assert resumed.run_id == t.run_id
    resumed.log_params(flat_params(run.to_dict()))  # already there: no error, nothing changed
    for step in (3, 4):
        resumed.log_metrics({"loss": 3.0 - step, "lr": 0.01}, step)
    resumed.finish()
    client = client_for(store)
    assert [m.step for m in client.get_metric_history(t.run_id, "loss")] == [1, 2, 3, 4]

    # evaluation logs into the same run
    ev = Tracker.for_run(run, stage="evaluate")
    ev.log_metrics({"AP": 12.5}, step=4)
    ev.finish()
    assert ev.run_id == t.run_id and client.get_run(t.run_id).data.metrics["AP"] == 12.5

    # training again from scratch: a new run; the old one goes to the trash, so one stays active
    again = Tracker.for_run(replace(run, spec={**run.spec, "seed": 5}), stage="train")  # other settings
    again.finish()
    assert [r.info.run_id for r in active_runs(store, "tiny")] == [again.run_id]
    assert client.get_run(t.run_id).info.lifecycle_stage == "deleted"


def test_flops_logged_before_training_stay_with_the_run(store):
    """Snakemake may count FLOPs before the training starts: the training adopts that run."""
    run = resolve(EXP, "tiny", store)
    tracking.log_run_outputs(run, "flops", [], {"gmacs_coco": 170.0}, 0)
    (made,) = active_runs(store, "tiny")
    assert made.info.status == "FINISHED"
    t = Tracker.for_run(run, stage="train")
    # FLOPs counted while the training runs land in its run and leave it RUNNING
    tracking.log_run_outputs(run, "flops", [], {"gmacs_tiny": 0.5}, 0)
    (only,) = active_runs(store, "tiny")
    assert only.info.run_id == t.run_id == made.info.run_id and only.info.status == "RUNNING"
    t.finish()
    (only,) = active_runs(store, "tiny")
    assert only.data.metrics["gmacs_coco"] == 170.0 and only.data.metrics["gmacs_tiny"] == 0.5
    assert only.info.status == "FINISHED"
    again = Tracker.for_run(run, stage="train")  # a fresh training after that: a new run
    again.finish()
    assert [r.info.run_id for r in active_runs(store, "tiny")] == [again.run_id] != [t.run_id]


def test_tracking_is_optional(store, monkeypatch, capsys):
    run = resolve(EXP, "tiny", store)
    with monkeypatch.context() as m:
        for name in ("mlflow", "mlflow.tracking"):  # as if not installed
            m.setitem(sys.modules, name, None)
        for _ in range(2):
            assert isinstance(Tracker.for_run(run, stage="train"), NullTracker)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "mlflow is not installed" in err  # warned once

    monkeypatch.setattr(tracking, "_warned", False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    t = Tracker.for_run(run, stage="train")
    assert isinstance(t, NullTracker) and time.monotonic() - t0 < 90
    assert "not usable" in capsys.readouterr().err
    t.log_metrics({"loss": 1.0}, 1)  # and every later call is a no-op

    monkeypatch.setenv("DYHEAD_TRACKING", "off")
    assert isinstance(Tracker.for_run(run, stage="train"), NullTracker)


_WRITER = """
import sys
from dyhead.config import resolve
from dyhead.engine.tracking import Tracker
run = resolve(sys.argv[1], "tiny")
t = Tracker.for_run(run, stage="train")
assert t.run_id, "no run"
for step in range(1, int(sys.argv[2]) + 1):
    t.log_metrics({"loss": 1.0 / step, "lr": 0.01, "loss_cls": 0.5, "loss_box": 0.25}, step)
t.finish()
"""


@pytest.mark.slow
def test_concurrent_writers_on_one_sqlite_file_lose_nothing(store):
    """Four processes create and fill a fresh store at once (MLflow alone loses runs to the schema
    race); then four more write while a reader holds the database locked for 7 s, longer than
    SQLite's 5 s busy timeout (MLflow alone fails with "database is locked")."""
    def writers(ids):
        return [subprocess.Popen([sys.executable, "-c", _WRITER, exp, "150"], cwd=store, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for exp in ids]

    def finish(procs):
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        assert not any("warning" in out for out in outputs), outputs

    first = ["atss-r50-base-1x", "atss-r50-dyh1-LSC-1x", "atss-r50-dyh2-LSC-1x", "atss-r50-dyh4-LSC-1x"]
    finish(writers(first))
    second = ["atss-r50-dyh6-L-1x", "atss-r50-dyh6-S-1x", "atss-r50-dyh6-C-1x", "atss-r50-dyh6-SC-1x"]
    con = sqlite3.connect(store / "mlflow.db")
    con.execute("BEGIN EXCLUSIVE")
    t0 = time.monotonic()
    procs = writers(second)
    time.sleep(7)
    con.rollback()
    con.close()
    finish(procs)
    assert time.monotonic() - t0 > 7

    client = client_for(store)
    runs = active_runs(store, "tiny")
    assert sorted(r.info.run_name for r in runs) == sorted(first + second)
    for r in runs:
        for key in ("loss", "lr", "loss_cls", "loss_box"):
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == list(range(1, 151))
        assert r.info.status == "FINISHED"


@pytest.mark.slow
def test_four_concurrent_trainings_and_a_killed_one_resumed(store):
    """Real `dyhead train` processes: four at once into one fresh store lose no run and no metric;
    one killed after a checkpoint and resumed continues its run with every step once."""
    set_profile(store, "track", schedules={"1x": 20, "2x": 40}, log_period=1, checkpoint_period=5)
    dyhead("synth", "--profile", "tiny", cwd=store)
    ids = ["atss-r50-base-1x", "atss-r50-dyh1-LSC-1x", "atss-r50-dyh2-LSC-1x", "atss-r50-dyh6-L-1x"]
    procs = [subprocess.Popen([sys.executable, "-m", "dyhead.cli", "train", exp, "--profile", "track",
                               "--dcn-backend", "torchvision"], cwd=store, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for exp in ids]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert not any("dyhead: warning" in out for out in outputs), outputs
    client = client_for(store)
    runs = active_runs(store, "track")
    assert sorted(r.info.run_name for r in runs) == sorted(ids)
    for r in runs:
        for key in ("loss", "lr", "loss_cls", "loss_box", "loss_ctr"):
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == list(range(1, 21)), key
        assert len(r.data.params) > 50 and r.data.tags["dcn_backend"] == "torchvision"
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["train.json"]

    # kill one mid-training (after its first checkpoint), resume it
    exp, run_dir = "atss-r50-dyh4-LSC-1x", store / "runs/track/atss-r50-dyh4-LSC-1x"
    args = [sys.executable, "-m", "dyhead.cli", "train", exp, "--profile", "track", "--dcn-backend", "torchvision"]
    proc = subprocess.Popen(args, cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints/last.pth"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.3)  # a few more logged steps that the resume recomputes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (run_dir / "model_final.pth").exists(), "the kill did not land mid-training"
    (killed,) = [r for r in active_runs(store, "track") if r.info.run_name == exp]
    assert killed.info.status == "RUNNING"
    assert "resuming from" in dyhead(*args[3:], cwd=store).stdout
    (final,) = [r for r in active_runs(store, "track") if r.info.run_name == exp]
    assert final.info.run_id == killed.info.run_id and final.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(final.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 21)), steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI: apt-get install -y chromium)")
def test_mlflow_ui_shows_the_runs(store, tmp_path):
    """`mlflow ui` on the repository's store: the REST API the page calls, then the page itself
    rendered by headless Chromium, list every run by its experiment id."""
    ids = ["atss-r50-base-1x", "atss-r50-dyh1-LSC-1x", "atss-r50-dyh2-LSC-1x"]
    for exp in ids:
        t = Tracker.for_run(resolve(exp, "tiny", store), stage="train")
        t.log_metrics({"loss": 1.0}, 1)
        t.finish()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=store,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow ui did not come up"
                time.sleep(0.5)
        exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=dyhead-tiny")["experiment"]
        found = _get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})
        assert sorted(r["info"]["run_name"] for r in found["runs"]) == sorted(ids)

        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              "--no-first-run",
                              f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=30000", "--dump-dom",
                              f"{base}/#/experiments/{exp['experiment_id']}/runs"],
                             capture_output=True, text=True, timeout=180).stdout
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<script.*?</script>", "", dom, flags=re.S)))
        assert "dyhead-tiny" in text, text[:2000]
        for exp_id in ids:
            assert exp_id in text, f"{exp_id} not on the runs page: {text[:2000]}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_pipeline_run_lands_in_mlflow(store):
    """A tiny Snakemake run of Table 2 (jobs in parallel): one run per experiment with params, the
    loss history, the AP metrics and the metrics/training JSON as artifacts."""
    snakemake("reports/table2.md", "--cores", "2", "--config", "profile=tiny", cwd=store)
    client = client_for(store)
    runs = active_runs(store, "tiny")
    expected = {"atss-r50-base-1x", "atss-r50-dyh1-LSC-1x", "atss-r50-dyh2-LSC-1x", "atss-r50-dyh4-LSC-1x",
                "atss-r50-dyh6-LSC-1x", "atss-r50-dyh8-LSC-1x", "atss-r50-dyh10-LSC-1x", "atss-r50-dyh6-LSC-1x-seed1"}
    assert sorted(r.info.run_name for r in runs) == sorted(expected)
    for r in runs:
        assert "table2" in r.data.tags["tables"] and len(r.data.params) > 50
        assert {"AP", "AP50", "loss", "lr"} <= set(r.data.metrics)
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 4  # tiny: 4 iterations, log period 1
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"metrics.json", "train.json", "table2.md"} <= artifacts, artifacts
        if not r.info.run_name.endswith("-seed1"):  # the rows' FLOPs (the noise run is not a row)
            assert "flops.json" in artifacts and r.data.metrics["gmacs_coco"] > 100, r.info.run_name
