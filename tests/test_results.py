"""reports/results.csv: every run of a profile in one DataFrame, its files validated, and the tables rebuilt
from a CSV alone with the numbers of the measured mini snapshots."""
import json
import re

import pandas as pd
import pytest

from dyhead.config import load_matrix
from dyhead.errors import DyheadError
from dyhead.report.results import COLUMNS, collect, read_results, write_results
from dyhead.report.tables import render_table, table_frame
from tests.helpers import REPO, dyhead, write_fake_run

SNAPSHOTS = REPO / "docs/results/mini"


def test_collect_reads_every_run_and_the_csv_gives_the_same_frame(repo_copy):
    matrix = load_matrix(profile="mini")
    write_fake_run(repo_copy, "mini", "atss-r50-base-1x", 24.5, gmacs=214.73)
    write_fake_run(repo_copy, "mini", "atss-r50-dyh2-LSC-1x", 20.0, gmacs=None,
                   spec=matrix.experiments["atss-r50-dyh2-LSC-1x"])
    write_fake_run(repo_copy, "mini", "atss-x101dcn-dyh6-LSC-2x-ms", 16.5, tta=True, min_size=[102, 128])
    (repo_copy / "runs/mini/empty-dir").mkdir()
    frame = collect("mini", matrix, repo_copy / "runs")
    assert list(frame.columns) == list(COLUMNS)
    assert list(frame["experiment"]) == ["atss-r50-base-1x", "atss-r50-dyh2-LSC-1x", "atss-x101dcn-dyh6-LSC-2x-ms"]
    rows = frame.set_index("experiment")
    base, dyh = rows.loc["atss-r50-base-1x"], rows.loc["atss-r50-dyh2-LSC-1x"]
    assert (base["AP"], base["APl"], base["gmacs_coco"], base["gmacs_profile"]) == (24.5, 29.5, 214.73, 2.1473)
    assert (base["head"], base["blocks"], base["attentions"], base["recipe"]) == ("base", 0, "-", "paper")
    assert (dyh["head"], dyh["blocks"], dyh["attentions"], dyh["schedule"]) == ("dyh2-LSC", 2, "LSC", "1x")
    assert pd.isna(dyh["gmacs_coco"])  # no flops.json: empty, not an error
    tta = rows.loc["atss-x101dcn-dyh6-LSC-2x-ms"]
    assert pd.isna(tta["AP"]) and tta["tta_AP"] == 16.5 and json.loads(tta["tta_settings"])["scales"] == [128, 96, 192]
    assert json.loads(tta["min_size_train"]) == [102, 128] and tta["backbone"] == "x101-dcn" and tta["multiscale"]

    path = write_results(frame, repo_copy / "reports/results.csv")
    pd.testing.assert_frame_equal(read_results(path), frame)


@pytest.mark.parametrize("name, edit, message", [
    ("metrics.json", lambda d: d.pop("metrics"), r"metrics.json: \(top level\): 'metrics' is a required property"),
    ("metrics.json", lambda d: d["metrics"].update(AP="high"), r"metrics.json: metrics.AP: 'high' is not of type 'number'"),
    ("flops.json", lambda d: d["coco"].pop("gmacs"), r"flops.json: coco: 'gmacs' is a required property"),
    ("train.json", lambda d: d["config"]["profile_settings"]["solver"].pop("base_lr"),
     r"train.json: config.profile_settings.solver: 'base_lr' is a required property"),
])
def test_a_run_file_of_the_wrong_shape_is_one_line_naming_file_and_key(repo_copy, name, edit, message):
    run = write_fake_run(repo_copy, "mini", "atss-r50-base-1x", 24.5)
    data = json.loads((run / name).read_text())
    edit(data)
    (run / name).write_text(json.dumps(data))
    with pytest.raises(DyheadError, match=f"runs/mini/atss-r50-base-1x/{message}"):
        collect("mini", load_matrix(profile="mini"), repo_copy / "runs")
    proc = dyhead("results", "--profile", "mini", cwd=repo_copy, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and re.search(message, proc.stderr)
    assert not (repo_copy / "reports/results.csv").exists()


def snapshot_rows(name: str) -> list[list[str]]:
    text = (SNAPSHOTS / f"{name}.md").read_text()
    return [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line]


def snapshot_csv(path, profile: str, records: list[dict]) -> None:
    """A results CSV of the measured runs, as a user would hand-write or trim one: only some columns."""
    pd.DataFrame([{"profile": profile, "annotations": "data/synthetic/annotations/instances_val.json",
                   "images": 1000, "iterations": 1000, "base_lr": 0.02, **r} for r in records]).to_csv(path, index=False)


def test_table2_from_a_csv_alone_keeps_the_snapshots_numbers(repo_copy):
    """The Table 2 mini snapshot (docs/results/mini/table2.md, its wide form table2.csv), written as a
    results CSV and rendered back: every number it printed for ours, the paper's, the gains and GFLOPs
    comes out the same."""
    matrix = load_matrix(profile="mini")
    header, *rows = snapshot_rows("table2")
    col = {h: i for i, h in enumerate(header)}
    wide_snapshot = pd.read_csv(SNAPSHOTS / "table2.csv")
    exps = [r["experiment"] for r in matrix.tables["table2"]["rows"]]
    assert list(wide_snapshot["experiment"]) == exps
    base_gflops = float(wide_snapshot["GFLOPs"][0])  # the CSV keeps 4 decimals, enough for Δ% to round alike
    records = []
    for exp, row, (_, w) in zip(exps, rows, wide_snapshot.iterrows()):
        gflops = float(w["GFLOPs"]) + (base_gflops if exp != exps[0] else 0.0)
        records.append({"experiment": exp, "gmacs_coco": gflops, "AP": float(row[col["AP"]]),
                        "AP50": float(w["AP50"]), "AP75": float(w["AP75"])})
    noise = re.search(r"gives AP [\d.]+ and ([\d.]+)", (SNAPSHOTS / "table2.md").read_text()).group(1)
    records.append({"experiment": "atss-r50-dyh6-LSC-1x-seed1", "AP": float(noise), "AP50": 1.0, "AP75": 1.0,
                    "gmacs_coco": 236.31})
    snapshot_csv(repo_copy / "results.csv", "mini", records)

    text = render_table("table2", matrix, "mini", read_results(repo_copy / "results.csv"))
    new_header, *new_rows = [line.strip("| ").split(" | ") for line in text.splitlines()
                             if line.startswith("| ") and "---" not in line]
    assert new_header == header == ["blocks", "GFLOPs", "GFLOPs (paper)", "Δ%", "AP", "AP (paper)", "AP gain",
                                    "AP gain (paper)"]
    assert new_rows == rows
    assert "gives AP 11.48 and 12.99 (|Δ| = 1.51)" in text
    assert "Training (mini): 1000 iterations at batch 8, base lr 0.02" in text
    wide = table_frame("table2", matrix, "mini", read_results(repo_copy / "results.csv"))
    assert list(wide["AP75 gain"]) == pytest.approx(list(wide_snapshot["AP75 gain"]), abs=0.006)
    assert list(wide["AP50"]) == pytest.approx(list(wide_snapshot["AP50"]))


def test_table3_from_a_csv_alone_keeps_the_snapshots_numbers_and_verdict(repo_copy):
    matrix = load_matrix(profile="mini")
    header, *rows = snapshot_rows("table3")
    col = {h: i for i, h in enumerate(header)}
    exps = [r["experiment"] for r in matrix.tables["table3"]["rows"]]  # the 3x experiments on mini
    records = [{"experiment": exp, "gmacs_coco": float(row[col["GFLOPs"]]), "iterations": 3000,
                **{m: float(row[col[m]]) for m in ("AP", "AP50", "AP75")},
                **({"base_lr": 0.01, "clip_grad_norm": 10} if exp.startswith("retinanet") else {})}
               for exp, row in zip(exps, rows)]
    snapshot_csv(repo_copy / "results.csv", "mini", records)
    text = render_table("table3", matrix, "mini", read_results(repo_copy / "results.csv"))
    new_header, *new_rows = [line.strip("| ").split(" | ") for line in text.splitlines()
                             if line.startswith("| ") and "---" not in line]
    for old, new in zip(rows, new_rows, strict=True):
        for column in ("detector", "DyHead", "GFLOPs", "AP", "AP (paper)", "AP gain", "AP gain (paper)"):
            assert new[new_header.index(column)] == old[col[column]], (column, old, new)
    snapshot = (SNAPSHOTS / "table3.md").read_text()
    verdict = next(line for line in snapshot.splitlines() if line.startswith("On the mini data"))
    assert verdict in text
    assert "Base lr 0.01 for `retinanet-r50-base-3x`" in text and "Gradient norm clipped at 10 for" in text


def test_a_run_the_table_needs_and_the_csv_lacks_is_one_line(repo_copy):
    snapshot_csv(repo_copy / "results.csv", "mini", [{"experiment": "atss-r50-base-1x", "AP": 24.89}])
    with pytest.raises(DyheadError, match=r"^runs/mini/atss-r50-base-1x/flops.json: not found, or without 'gmacs_coco'"):
        render_table("table2", load_matrix(profile="mini"), "mini", read_results(repo_copy / "results.csv"))
    (repo_copy / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DyheadError, match=r"bad.csv: no column 'profile'"):
        read_results(repo_copy / "bad.csv")


def test_the_training_sentence_names_the_machine_and_says_when_rows_mix_machines(repo_copy):
    matrix = load_matrix(profile="mini")
    exps = matrix.table_experiments("table2")
    for i, exp in enumerate(exps):
        write_fake_run(repo_copy, "mini", exp, 20.0 + i, spec=matrix.experiments[exp],
                       machines=["Xeon A (AVX512, AMX)"])
    text = render_table("table2", matrix, "mini", collect("mini", matrix, repo_copy / "runs"))
    assert " Trained on Xeon A (AVX512, AMX)." in text and "more than one machine" not in text

    moved = "atss-r50-dyh6-LSC-1x-seed1"  # the noise pair's twin counts too: it is not a row of its own
    write_fake_run(repo_copy, "mini", moved, 20.0, spec=matrix.experiments[moved],
                   machines=["Xeon A (AVX512, AMX)", "EPYC B (AVX2)"])
    frame = collect("mini", matrix, repo_copy / "runs")
    assert frame.set_index("experiment").at[moved, "machines"] == "Xeon A (AVX512, AMX) + EPYC B (AVX2)"
    text = render_table("table2", matrix, "mini", frame)
    assert "Trained on more than one machine type" in text
    assert f"`{moved}` on Xeon A (AVX512, AMX) + EPYC B (AVX2)" in text
    assert "`atss-r50-base-1x`, " in text.split("more than one machine type")[1]

    for exp in exps:  # runs from before train.json named its machine: the sentence says nothing of machines
        write_fake_run(repo_copy, "mini", exp, 20.0, spec=matrix.experiments[exp])
    assert "Trained on" not in render_table("table2", matrix, "mini", collect("mini", matrix, repo_copy / "runs"))


def test_dyhead_report_writes_the_table_its_csv_and_results_csv(repo_copy, monkeypatch):
    monkeypatch.setenv("DYHEAD_TRACKING", "off")
    matrix = load_matrix(profile="mini")
    for i, exp in enumerate(matrix.table_experiments("table2")):
        write_fake_run(repo_copy, "mini", exp, 20.0 + i, gmacs=200.0 + i, spec=matrix.experiments[exp])
    write_fake_run(repo_copy, "mini", "fcos-r50-base-1x", 30.0, spec=matrix.experiments["fcos-r50-base-1x"])
    write_fake_run(repo_copy, "tiny", "atss-r50-base-1x", 1.0)  # another profile's run: not in mini's results
    dyhead("report", "table2", "--profile", "mini", cwd=repo_copy)
    results = read_results(repo_copy / "reports/results.csv")
    assert len(results) == len(matrix.table_experiments("table2")) + 1 and set(results["profile"]) == {"mini"}
    table = pd.read_csv(repo_copy / "reports/table2.csv")
    assert list(table["experiment"]) == [r["experiment"] for r in matrix.tables["table2"]["rows"]]
    assert list(table["AP gain"]) == pytest.approx([float(i) for i in range(len(table))])
    # the markdown is the same rebuilt from the CSV alone
    rebuilt = render_table("table2", matrix, "mini", results)
    assert (repo_copy / "reports/table2.md").read_text() == rebuilt


def test_each_table_opens_with_the_trend_against_the_paper(repo_copy, monkeypatch):
    """Sign agreement per row and Spearman's rho of the gains, in one line under the title."""
    monkeypatch.setenv("DYHEAD_TRACKING", "off")
    matrix = load_matrix(profile="mini")
    # gains -1, 1, 2, 3, 2.5, 4 against the paper's -2.3, 0.5, 3.0, 3.6, 3.5, 3.3: every sign agrees; the ranks
    # differ in the last three (d = -1, -1, 2): rho = 1 - 6 * 6 / (6 * 35) = 0.83
    ours = {0: 30.0, 1: 29.0, 2: 31.0, 4: 32.0, 6: 33.0, 8: 32.5, 10: 34.0}
    for exp in matrix.table_experiments("table2"):
        blocks = matrix.experiments[exp]["head"]["blocks"]
        write_fake_run(repo_copy, "mini", exp, ours[blocks], spec=matrix.experiments[exp])
    dyhead("report", "table2", "--profile", "mini", cwd=repo_copy)
    lines = (repo_copy / "reports/table2.md").read_text().splitlines()
    assert lines[2] == ("Trend vs the paper: our AP gain has the paper's sign in 6 of 6 rows; "
                        "Spearman rank correlation of the gains +0.83.")
    html = (repo_copy / "reports/table2.html").read_text()
    assert "<table>" in html and "Trend vs the paper" in html


def test_the_trend_line_with_equal_gains_says_so_without_a_warning():
    """Every row at the same gain (cocolike's AP 0 after 4 iterations): no rank correlation, and no
    ConstantInputWarning from scipy on the report's output."""
    import warnings

    from dyhead.report.tables import trend_line

    rows = [{"id": i} for i in range(4)]
    records = [{"AP gain": 0.0, "AP gain (paper)": p} for p in (0.0, -2.3, 0.5, 3.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        line = trend_line(records, [rows[0]] * 4, rows)
    assert line == ("Trend vs the paper: our AP gain has the paper's sign in 0 of 3 rows; "
                    "rank correlation needs 3 rows with distinct gains.")
