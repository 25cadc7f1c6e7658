import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """A scratch copy of the repository's params/ and workflow/ to edit and run in."""
    for name in ("params", "workflow"):
        shutil.copytree(REPO / name, tmp_path / name)
    shutil.copy(REPO / "Snakefile", tmp_path / "Snakefile")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DYHEAD_ROOT", str(tmp_path))
    return tmp_path
