"""Tables 4-5: the paper's quoted rows as printed, our DyHead rows (and the TTA row) from the results frame."""
from pathlib import Path

import pytest
import yaml

from dyhead.config import load_matrix
from dyhead.report.results import collect
from dyhead.report.tables import render_table, table_frame
from tests.helpers import write_fake_run

PAPER = Path("/work/shared/paper/tables.yaml")


def test_tables_4_and_5_render(repo_copy):
    matrix = load_matrix(profile="mini")
    write_fake_run(repo_copy, "mini", "atss-r50-dyh6-LSC-1x", 30.0)
    write_fake_run(repo_copy, "mini", "atss-r101-dyh6-LSC-2x", 31.0, base_lr=0.01)
    write_fake_run(repo_copy, "mini", "atss-x101-dyh6-LSC-2x", 32.0, base_lr=0.01)
    write_fake_run(repo_copy, "mini", "atss-x101dcn-dyh6-LSC-2x-ms", 33.0, min_size=[102, 128], base_lr=0.01)
    write_fake_run(repo_copy, "mini", "atss-x101dcn-dyh6-LSC-2x-ms", 34.5, min_size=[102, 128], tta=True, base_lr=0.01)
    results = collect("mini", matrix, repo_copy / "runs")

    t4 = render_table("table4", matrix, "mini", results)
    lines = [line for line in t4.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 10 + 3  # header, quoted, ours
    assert lines[0] == "| method | backbone | schedule | ours | AP | AP (paper) | AP50 | AP50 (paper) | AP75 | AP75 (paper) |"
    assert lines[1] == "| Mask R-CNN | ResNet-101 | 2x | quoted | – | 38.20 | – | 60.30 | – | 41.70 |"
    assert "| DyHead | ResNet-101 | 2x | `atss-r101-dyh6-LSC-2x` | 31.00 | 46.50 | 51.00 | 64.50 | 33.00 | 50.70 |" in t4
    assert "test-dev" in t4 and "not run here" in t4
    assert "Base lr 0.01 for `atss-r101-dyh6-LSC-2x`, `atss-x101-dyh6-LSC-2x`." in t4
    wide = table_frame("table4", matrix, "mini", results)  # every metric, and ours - paper
    ours = wide[wide["experiment"] == "atss-r101-dyh6-LSC-2x"].iloc[0]
    assert (ours["APs"], ours["APs (paper)"], ours["ΔAPs"]) == (21.0, 28.3, -7.3)

    t5 = render_table("table5", matrix, "mini", results)
    rows = [line.split(" | ") for line in t5.splitlines() if line.startswith("| ") and "---" not in line][1:]
    settings = [r[0].removeprefix("| ") for r in rows]
    # each setting's quoted rows, then our row for it: ms train, then ms train + ms test
    assert settings == ["ms train"] * 10 + ["ms train + ms test"] * 6
    assert rows[9][4] == "`atss-x101dcn-dyh6-LSC-2x-ms`" and rows[9][5] == "33.00"
    assert rows[15][4] == "`atss-x101dcn-dyh6-LSC-2x-ms` + TTA" and rows[15][5] == "34.50"
    assert "short side 102–128 px (multi-scale)" in t5 and "TTA (`atss-x101dcn-dyh6-LSC-2x-ms`)" in t5
    assert "It changes AP by +1.50 here (paper: +1.70)." in t5


@pytest.mark.skipif(not PAPER.exists(), reason="the shared transcription of the paper is not on this machine")
def test_quoted_rows_are_the_papers():
    paper = yaml.safe_load(PAPER.read_text())
    tables = load_matrix(Path(__file__).resolve().parents[1]).tables
    metrics = ["AP", "AP50", "AP75", "APs", "APm", "APl"]

    def rows_of(name):
        t = paper[name]
        return t["rows"] if "rows" in t else [r for group in t["groups"].values() for r in group]

    for name in ("table4", "table5"):
        quoted = [(r["method"], r["backbone"], r["schedule"], [r[m] for m in metrics])
                  for r in rows_of(name) if not r["reproduced"]]
        ours = [(r["label"]["method"], r["label"]["backbone"], r["label"]["schedule"], [r["paper"][m] for m in metrics])
                for r in tables[name]["literature"]]
        assert ours == quoted
        dyhead = [[r[m] for m in metrics] for r in rows_of(name) if r["reproduced"]]
        assert [[r["paper"][m] for m in metrics] for r in tables[name]["rows"]] == dyhead
