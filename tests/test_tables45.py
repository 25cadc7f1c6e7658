"""Tables 4-5: the paper's quoted rows as printed, our DyHead rows (and the TTA row) from the runs' JSON."""
from pathlib import Path

import pytest
import yaml

from dyhead.config import load_matrix
from dyhead.files import save_json
from dyhead.report.tables import render_table

PAPER = Path("/work/shared/paper/tables.yaml")


def fake_run(root: Path, exp: str, ap: float, min_size, tta: bool = False):
    run = root / "runs/mini" / exp
    metrics = {"AP": ap, "AP50": ap + 20, "AP75": ap + 2, "APs": ap - 10, "APm": ap, "APl": ap + 5}
    record = {"annotations": "data/synthetic/annotations/instances_val.json", "images": 1000, "metrics": metrics,
              "eval_seconds": 12.0}
    if tta:
        record["tta"] = {"scales": [128, 96, 192], "flip": True, "size_ranges": None, "nms_thresh": 0.6,
                         "detections_per_img": 100}
    save_json(run / ("metrics_tta.json" if tta else "metrics.json"), record)
    save_json(run / "train.json", {"iterations": 2000, "config": {"profile_settings": {"input": {"min_size_train": min_size}}}})


def test_tables_4_and_5_render(repo_copy):
    matrix = load_matrix()
    fake_run(repo_copy, "atss-r50-dyh6-LSC-1x", 30.0, 128)
    fake_run(repo_copy, "atss-r101-dyh6-LSC-2x", 31.0, 128)
    fake_run(repo_copy, "atss-x101-dyh6-LSC-2x", 32.0, 128)
    fake_run(repo_copy, "atss-x101dcn-dyh6-LSC-2x-ms", 33.0, [102, 128])
    fake_run(repo_copy, "atss-x101dcn-dyh6-LSC-2x-ms", 34.5, [102, 128], tta=True)

    t4 = render_table("table4", matrix, "mini", repo_copy / "runs")
    lines = [line for line in t4.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 10 + 3  # header, quoted, ours
    assert lines[1].startswith("| Mask R-CNN | ResNet-101 | 2x | quoted | – | 38.20 | – |")
    assert "| DyHead | ResNet-101 | 2x | `atss-r101-dyh6-LSC-2x` | 31.00 | 46.50 | -15.50 |" in t4
    assert "test-dev" in t4 and "not run here" in t4

    t5 = render_table("table5", matrix, "mini", repo_copy / "runs")
    rows = [line.split(" | ") for line in t5.splitlines() if line.startswith("| ") and "---" not in line][1:]
    settings = [r[0].removeprefix("| ") for r in rows]
    # each setting's quoted rows, then our row for it: ms train, then ms train + ms test
    assert settings == ["ms train"] * 10 + ["ms train + ms test"] * 6
    assert rows[9][4] == "`atss-x101dcn-dyh6-LSC-2x-ms`" and rows[9][5] == "33.00"
    assert rows[15][4] == "`atss-x101dcn-dyh6-LSC-2x-ms` + TTA" and rows[15][5] == "34.50"
    assert "short side 102–128 px (multi-scale)" in t5 and "TTA (`atss-x101dcn-dyh6-LSC-2x-ms`)" in t5


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
