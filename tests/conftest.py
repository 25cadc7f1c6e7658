import shutil

import pytest

from tests.helpers import REPO, run


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """A scratch copy of the repository's params/, workflow/, committed stand-ins and Snakemake's default profile,
    to edit and run in (without profiles/ Snakemake would not `rerun-incomplete` as it does for a user)."""
    for name in ("params", "workflow", "profiles", "data/standins"):  # the committed stand-ins: a checkout has them
        shutil.copytree(REPO / name, tmp_path / name)
    shutil.copy(REPO / "Snakefile", tmp_path / "Snakefile")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DYHEAD_ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture
def dvc_repo(repo_copy):
    """The scratch copy as a fresh git + DVC repository, with the package sources the stages depend on."""
    shutil.copytree(REPO / "dyhead", repo_copy / "dyhead", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copytree(REPO / ".dvc", repo_copy / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    shutil.copy(REPO / ".dvcignore", repo_copy / ".dvcignore")
    run("git", "init", "-q", cwd=repo_copy)
    return repo_copy


def pytest_terminal_summary(terminalreporter):
    """The fault-injection tally (tests/test_faults.py): kills injected, where, and how many landed mid-run."""
    from tests.helpers import FAULTS

    if not FAULTS:
        return
    steps: dict = {}
    for f in FAULTS:
        s = steps.setdefault(f["step"], {"kills": 0, "landed": 0, "at": []})
        s["kills"] += 1
        s["landed"] += f["landed"]
        s["at"].append(f["at_seconds"])
    terminalreporter.section("fault injection")
    for step, s in steps.items():
        terminalreporter.write_line(f"{step}: {s['kills']} kill(s), {s['landed']} landed mid-run, at {s['at']} s")
