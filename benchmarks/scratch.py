"""A scratch root for benchmarks that run the real `dyhead` commands: params/ copied with one profile edited,
data/ linked to this checkout's (nothing made twice), runs/ of its own, MLflow off. The pipeline's runs/ and
params/ are never touched."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = "import sys; from dyhead.cli import main; sys.exit(main())"  # `dyhead ARGS` with this checkout's package


def make_scratch(workdir: Path, profile_name: str, edit: Callable[[dict], None]) -> tuple[Path, dict]:
    """Empty `workdir`, copy params/ into it, link data/, and apply `edit` to the profile there. Returns the
    root and the profile as edited; exits with one line when the profile does not exist."""
    root = workdir.resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    shutil.copytree(REPO / "params", root / "params")
    (REPO / "data").mkdir(exist_ok=True)
    (root / "data").symlink_to(REPO / "data")
    path = root / "params" / "profiles" / f"{profile_name}.yaml"
    if not path.exists():
        raise SystemExit(f"unknown profile {profile_name!r}: no params/profiles/{profile_name}.yaml")
    profile = yaml.safe_load(path.read_text())
    edit(profile)
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return root, profile


def dyhead_env(root: Path) -> dict:
    """The environment of a `dyhead` child working in `root`: this checkout's package and extension."""
    env = dict(os.environ, DYHEAD_ROOT=str(root), DYHEAD_TRACKING="off")
    env.setdefault("DYHEAD_EXT_DIR", str(REPO / "build" / "ext"))  # this checkout's extension, if built
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_dyhead(root: Path, argv: list[str], *, child: str = CLI, capture: bool = False):
    """`dyhead ARGV` in `root` as a child process (`child`: the Python it runs); returns (wall seconds, the
    finished process). A failure exits with one line and, when captured, the end of the child's output."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", child, *argv], cwd=root, env=dyhead_env(root), capture_output=capture,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = f":\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}" if capture else ""
        raise SystemExit(f"dyhead {' '.join(argv)} failed (rc {proc.returncode}){tail}")
    return wall, proc


def ensure_data(root: Path, profile_name: str, profile: dict, **kw) -> None:
    """A synthetic profile's data made in this checkout's data/ (linked) if it is not there yet."""
    data = profile["data"]
    if data["source"] != "coco" and not (root / data["root"] / "synth.json").exists():
        run_dyhead(root, ["synth", "--profile", profile_name], **kw)
