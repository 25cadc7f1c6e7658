import shutil

import pytest

from tests.helpers import REPO, run


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """A scratch copy of the repository's params/ and workflow/ to edit and run in."""
    for name in ("params", "workflow"):
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
