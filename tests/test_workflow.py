"""A real Snakemake run of the tiny profile, end to end, twice: the tables must come out identical."""
import shutil

import pytest

from tests.helpers import snakemake

TARGETS = ["reports/table1.md", "reports/table2.md"]
TINY = ["--cores", "2", *TARGETS, "--config", "profile=tiny"]


@pytest.mark.slow
def test_tiny_profile_end_to_end_is_deterministic(repo_copy, monkeypatch):
    monkeypatch.delenv("DYHEAD_EXT_DIR", raising=False)
    snakemake(*TINY, cwd=repo_copy)
    first = {t: (repo_copy / t).read_text() for t in TARGETS}
    assert (repo_copy / "build/ext/manifest.json").exists()
    for t, text in first.items():
        assert "profile **tiny**" in text
        assert "| 10 |" in first["reports/table2.md"]  # the 10-block row
    # GFLOPs come from the coco-profile model whatever profile trained it
    assert "| 0 | 214.73 | 254.39 |" in first["reports/table2.md"]

    # nothing left to do
    dry = snakemake("-n", *TINY, cwd=repo_copy)
    assert "Nothing to be done" in dry.stdout + dry.stderr

    shutil.rmtree(repo_copy / "runs")
    for t in TARGETS:
        (repo_copy / t).unlink()
    snakemake(*TINY, cwd=repo_copy)
    for t in TARGETS:
        assert (repo_copy / t).read_text() == first[t], f"{t} differs between two identical runs"
