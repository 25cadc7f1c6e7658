"""MLflow tracking: one MLflow run per (profile, experiment), written by rank 0 only.

    tracker = Tracker.for_run(run, stage="train", resumed=start > 0)
    tracker.log_params(flat_params(run.to_dict()))
    tracker.log_metrics({"loss": 0.7, "lr": 0.01}, step=20)
    tracker.log_artifact(path)
    tracker.finish("FINISHED")

Store: $MLFLOW_TRACKING_URI (a shared `mlflow server`), else sqlite:///<repo>/mlflow.db, so a bare
`mlflow ui` in the repository root shows every run. MLflow experiment `dyhead-<profile>`, created
with its artifact location under <repo>/mlartifacts/ (MLflow's default, ./mlruns, would follow the
cwd of whichever job created it); a remote server keeps its own artifact root.

Which MLflow run: the active one tagged run_key=<profile>/<experiment>. A training that starts
from iteration 0 opens a new run and soft-deletes the key's earlier ones (restorable from MLflow's
trash), so each key has one active run; a training resumed from its checkpoint after a kill finds
its run by that tag (and its settings digest), continues it and skips the steps already logged
(the resume recomputes them identically), so the history holds each step once. Evaluation logs
into the key's run.

Many jobs on one SQLite file (Snakemake --cores all). Measured (docs/cluster.md): on a fresh
file, 7 of 8 processes lost their run to the schema-creation race ("table alembic_version already
exists", "duplicate column name: step"); once created, SQLite's 5 s busy timeout serialises the
small writes, but a writer blocked longer (a long read from `mlflow ui`, a slow disk) fails with
"database is locked"; a schema migration cut short by such a lock leaves a file no job can open.
So a new store is migrated in a private file and renamed into place, and every call to a SQLite
store (store creation and run lookup included) holds an exclusive file lock beside the database
and is retried with backoff for up to RETRY_SECONDS: nothing is lost unless the store stays
unusable that long. A server needs no lock.

Optional by design: without mlflow installed, with DYHEAD_TRACKING=off, or when the store cannot
be reached, one warning is printed and training goes on untracked.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from dyhead.config import RunConfig, repo_root, spec_axes

RETRY_SECONDS = 120.0  # per call, while training runs
START_SECONDS = 15.0  # to open the run: an unreachable store is told at once
_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        print(f"dyhead: warning: {message}; continuing without MLflow tracking", file=sys.stderr)
        _warned = True


def tracking_uri(root: Path | None = None) -> str:
    root = root or repo_root()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists as their repr (MLflow params are strings)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


@functools.lru_cache(maxsize=None)
def git_state(root: Path) -> tuple[str, str]:
    """(commit, "true"/"false" dirty), or ("unknown", "unknown") outside a git checkout; asked once per process."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", "unknown"
    if commit.returncode != 0:
        return "unknown", "unknown"
    return commit.stdout.strip(), str(bool(status.stdout.strip())).lower()


class NullTracker:
    """Tracking off: every call does nothing."""

    run_id = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    def __init__(self, client, run_id: str, lock_path: Path | None, skip_until: int = -1):
        self.client, self.run_id, self._lock_path = client, run_id, lock_path
        self._skip_until = skip_until  # steps <= this were logged before a kill; resume recomputes them
        self._off = self._finished = False
        atexit.register(self._exit)  # a job that dies of an exception leaves a FAILED run, not RUNNING

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def for_run(cls, run: RunConfig, *, stage: str, resumed: bool = False,
                tags: dict | None = None, root: Path | None = None) -> NullTracker:
        """The MLflow run of `run` (see the module doc for which one); NullTracker when off."""
        if os.environ.get("DYHEAD_TRACKING", "").lower() in ("0", "off", "false", "no"):
            return NullTracker()
        root = root or repo_root()
        uri = tracking_uri(root)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            _warn_once("mlflow is not installed (pip install 'mlflow>=3.7,<4')")
            return NullTracker()
        # a job's stderr carries its own messages (one line per error), not MLflow's store chatter, nor
        # the traceback it logs for each "database is locked" that _retry then waits out
        logging.getLogger("mlflow").setLevel(max(logging.getLogger("mlflow").getEffectiveLevel(), logging.WARNING))
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        db = _sqlite_path(uri)
        lock_path = db.with_name(db.name + ".lock") if db else None
        if not db:  # a server: fail fast at start instead of MLflow's minutes of HTTP retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        try:
            all_tags = run_tags(run, root, tags or {})  # git asked outside the lock
            with _file_lock(lock_path):  # the first job creates the schema
                _retry(lambda: _create_store(MlflowClient, uri), START_SECONDS)
            client = _retry(lambda: MlflowClient(uri), START_SECONDS)  # reads the schema: no lock needed
            with _file_lock(lock_path):  # one job at a time looks up or creates its run
                exp_id = _retry(lambda: _experiment(client, f"dyhead-{run.profile_name}", uri, root), START_SECONDS)
                run_id, skip = _retry(lambda: _find_or_create(client, exp_id, run, stage, resumed, all_tags),
                                      START_SECONDS)
        except Exception as exc:  # the store is unreachable or refuses us: never stop training
            _warn_once(f"MLflow store {uri} not usable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            return NullTracker()
        return cls(client, run_id, lock_path, skip)

    # -- the API the trainer and evaluator use --------------------------------------------------
    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        def write():
            have = self.client.get_run(self.run_id).data.params
            new = [Param(k[:250], str(v)[:6000]) for k, v in params.items() if k[:250] not in have]
            for i in range(0, len(new), 100):  # MLflow's batch limit for params
                self.client.log_batch(self.run_id, params=new[i:i + 100])
        self._call(write)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if step <= self._skip_until:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # fixed before retries, so a retried batch is the same rows
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        if Path(path).is_file():
            self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        self._finished = True
        self._call(lambda: self.client.set_terminated(self.run_id, status))

    def finish_outputs(self, stage: str) -> None:
        """After FLOPs or a report: close the run only if this stage created it (a training may be running)."""
        self._finished = True

        def close():
            info = self.client.get_run(self.run_id)
            if info.info.status == "RUNNING" and info.data.tags.get("created_by") == stage:
                self.client.set_terminated(self.run_id, "FINISHED")
        self._call(close)

    def _exit(self) -> None:
        if not self._finished:
            self.finish("FAILED")

    # -- plumbing ----------------------------------------------------------------------------------
    def _call(self, fn):
        if self._off:
            return None
        try:
            with _file_lock(self._lock_path):
                return _retry(fn)
        except Exception as exc:
            self._off = True
            _warn_once(f"MLflow logging failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            return None


def _create_store(client_cls, uri: str) -> None:
    """A new SQLite file gets its schema in a private file, renamed into place when complete: a
    migration interrupted by another process's lock (a reader, `mlflow ui`) would leave a half-built
    schema that no later job can open ("duplicate column name")."""
    db = _sqlite_path(uri)
    if db is not None and (not db.exists() or db.stat().st_size == 0):  # sqlite3.connect leaves 0 bytes
        db.parent.mkdir(parents=True, exist_ok=True)
        tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
        try:
            client_cls(f"sqlite:///{tmp}")  # the constructor creates and migrates the schema
            os.replace(tmp, db)
        finally:
            tmp.unlink(missing_ok=True)


def _file_lock(path: Path | None):
    """An exclusive lock beside a SQLite store (filelock comes with torch); a no-op for servers."""
    if path is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=RETRY_SECONDS)


def _retry(fn, budget: float | None = None):
    """fn() retried with exponential backoff (0.1 s doubling to 5 s) until it succeeds or the
    budget is spent; MLflow's own errors for bad input are not retried."""
    from mlflow.exceptions import MlflowException

    budget = RETRY_SECONDS if budget is None else budget
    deadline, delay = time.monotonic() + budget, 0.1
    while True:
        try:
            return fn()
        except MlflowException as exc:
            if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST") or time.monotonic() > deadline:
                raise
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _experiment(client, name: str, uri: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    remote = uri.startswith(("http://", "https://", "databricks"))
    location = None if remote else (root / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another job (another host on a shared server) created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_tags(run: RunConfig, root: Path, extra: dict) -> dict[str, str]:
    """The run's identity, and its axes (detector, backbone, blocks, attentions, ..., recipe, grids) so that
    `mlflow ui` filters and groups by any of them: tags.detector = 'fcos' and tags.grids LIKE '%quick%'."""
    commit, dirty = git_state(root)
    axes = {k: str(v) for k, v in spec_axes(run.spec).items()}
    return {"run_key": f"{run.profile_name}/{run.experiment}", "experiment": run.experiment,
            "profile": run.profile_name, "settings_digest": run.digest, **axes,
            "tables": ",".join(run.tables), "grids": ",".join(run.grids), "git_commit": commit,
            "git_dirty": dirty, "mlflow.source.git.commit": commit, **{k: str(v) for k, v in extra.items()}}


def _find_or_create(client, exp_id: str, run: RunConfig, stage: str, resumed: bool,
                    tags: dict) -> tuple[str, int]:
    from mlflow.entities import ViewType

    key = tags["run_key"]
    found = client.search_runs([exp_id], filter_string=f"tags.run_key = '{key}'", run_view_type=ViewType.ACTIVE_ONLY,
                               order_by=["attributes.start_time DESC"], max_results=20)
    same = [r for r in found if r.data.tags.get("settings_digest") == run.digest]
    if stage == "train":
        current = same[0] if resumed and same else None  # only a resume continues a run
        if current is None:  # adopt a run that only finished outputs (FLOPs, counted before training) made
            current = next((r for r in same if r.data.tags.get("created_by", "train") != "train"), None)
        for r in found:  # one active run per key: older trainings stay restorable in MLflow's trash
            if current is None or r.info.run_id != current.info.run_id:
                client.delete_run(r.info.run_id)
    else:
        current = same[0] if same else (found[0] if found else None)

    if current is None:
        created = client.create_run(exp_id, run_name=run.experiment, tags={**tags, "created_by": stage})
        return created.info.run_id, -1
    run_id = current.info.run_id
    from mlflow.entities import RunTag

    if stage == "train":
        tags = {**tags, "created_by": "train"}  # an adopted run is a training's run from now on
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if stage in ("train", "evaluate"):  # FLOPs and reports leave a run's status alone (it may be training)
        client.update_run(run_id, status="RUNNING")
    logged = [m.step for m in client.get_metric_history(run_id, "loss")] if stage == "train" else []
    return run_id, max(logged, default=-1)


def log_run_outputs(run: RunConfig, stage: str, files: list[Path], metrics: dict, step: int) -> None:
    """One-shot logging of finished outputs (metrics JSON, FLOPs, reports) into the run of `run`."""
    tracker = Tracker.for_run(run, stage=stage)
    tracker.log_metrics(metrics, step)
    for path in files:
        tracker.log_artifact(path)
    if stage == "evaluate" or not isinstance(tracker, Tracker):
        tracker.finish("FINISHED")
    else:
        tracker.finish_outputs(stage)
