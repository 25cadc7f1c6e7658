"""`dyhead figure curves|gains <table>`: a table's runs drawn, from their files alone (matplotlib, PNG).

    curves  loss and lr per logged step, and AP at the curve points (profile `curve`), from each row's
            log.jsonl; baselines dashed, DyHead rows solid     -> reports/figures/curves_<table>.png
    gains   each row's AP gain against its baseline, ours beside the paper's (Table 2: against the
            number of blocks, with the GFLOPs change beside)   -> reports/figures/gains_<table>.png
    convergence  AP curves of the convergence control's long runs and of Table 3's detector pairs
                                                               -> reports/figures/convergence.png

Both read the same files the tables do (log.jsonl; the results frame of dyhead/report/results.py and the
paper numbers of params/tables.yaml) and are logged to every MLflow run of the table.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dyhead import plots
from dyhead.config import Matrix, load_matrix, resolve
from dyhead.engine.tracking import log_run_outputs
from dyhead.errors import DyheadError
from dyhead.report.results import Runs, collect
from dyhead.report.tables import GROUP_LABEL, ablation_records, baselines

FIGURES = Path("reports/figures")


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(loss records, curve records) of a log.jsonl; a bad line is one error naming it."""
    steps, curve = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DyheadError(f"{path}: line {n} is not valid JSON") from None
        (curve if "curve_ap" in record else steps).append(record)
    return steps, curve


def row_name(row: dict, labels: list[str]) -> str:
    """A table row as a short legend entry: its label values ('✓' columns by name)."""
    parts = []
    for k in labels:
        v = str(row["label"].get(k, ""))
        parts.append(k if v == "✓" else v)
    return " ".join(p for p in parts if p).strip() or "baseline"


def _table_rows(name: str, matrix: Matrix) -> list[dict]:
    if name not in matrix.tables:
        raise DyheadError(f"unknown table {name!r}; params/tables.yaml defines {', '.join(sorted(matrix.tables))}")
    return matrix.tables[name]["rows"]


def _log_to_runs(name: str, matrix: Matrix, profile: str, path: Path) -> None:
    for exp in matrix.table_experiments(name):
        run = resolve(exp, profile, matrix=matrix)
        if (run.run_dir / "train.json").exists():
            log_run_outputs(run, "figures", [path], {}, 0)


def curves(name: str, profile: str, out: Path | None = None, runs_root: Path = Path("runs"), log=print,
           seeds: int | None = None) -> Path:
    """The rows' first seeds (the experiments the rows name)."""
    matrix = load_matrix(profile=profile, seeds=seeds)
    rows = _table_rows(name, matrix)
    labels = matrix.tables[name]["labels"]
    fig, axes = plots.figure(1, 3, size=(14.0, 3.8))
    drawn = 0
    colors = plots.plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        exp = row["experiment"]
        path = runs_root / profile / exp / "log.jsonl"
        if not path.exists():
            continue
        steps, curve = read_log(path)
        baseline = matrix.experiments[exp]["head"]["blocks"] == 0
        style = {"color": colors(i % 10), "ls": "--" if baseline else "-", "lw": 1.2,
                 "label": row_name(row, labels) + (" (baseline)" if baseline else "")}
        it = [r["iteration"] for r in steps]
        axes[0, 0].plot(it, [r["loss"] for r in steps], **style)
        axes[0, 1].plot(it, [r["lr"] for r in steps], **style)
        if curve:
            axes[0, 2].plot([r["iteration"] for r in curve], [r["curve_ap"] for r in curve], marker="o", ms=3, **style)
        drawn += 1
    if not drawn:
        raise DyheadError(f"{name}: no row has a log.jsonl under {runs_root / profile}; train them first")
    for ax, what in zip(axes[0], ("training loss (sum, per log period)", "learning rate",
                                  "AP on the curve's val subset (%)")):
        ax.set_title(what, fontsize=9)
        ax.set_xlabel("iteration")
    axes[0, 2].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{name} ({profile}): {matrix.tables[name]['title']}", fontsize=9)
    path = plots.save(fig, out or FIGURES / f"curves_{name}.png")
    _log_to_runs(name, matrix, profile, path)
    log(f"wrote {path}")
    return path


def gains(name: str, profile: str, out: Path | None = None, runs_root: Path = Path("runs"), log=print,
          seeds: int | None = None) -> Path:
    """AP gains ours vs the paper's per row (the mean over seeds); Table 2's against the blocks."""
    matrix = load_matrix(profile=profile, seeds=seeds)
    rows = _table_rows(name, matrix)
    table = matrix.tables[name]
    if "literature" in table:
        raise DyheadError(f"{name}: a comparison with quoted methods has no baseline rows to gain against; "
                          "`dyhead figure gains` draws the ablation tables (1-3 and the controls)")
    runs = Runs(collect(profile, matrix, runs_root), profile)
    records = ablation_records(name, matrix, runs)
    grouped = GROUP_LABEL in table["labels"]
    baseline_of = baselines(rows, GROUP_LABEL if grouped else None)
    keep = [i for i, r in enumerate(rows) if r is not baseline_of[i]]  # a gain is against a baseline: not its own
    names = [row_name(rows[i], table["labels"]) for i in keep]
    ours = [records[i]["AP gain"] for i in keep]
    paper = [records[i]["AP gain (paper)"] for i in keep]
    by_blocks = table["labels"] == ["blocks"] and all(isinstance(rows[i]["label"]["blocks"], int) for i in keep)
    flops = bool(table.get("flops")) and not grouped
    fig, axes = plots.figure(1, 2 if flops else 1, size=(11.0 if flops else 6.5, 3.8))
    ax = axes[0, 0]
    if by_blocks:
        x = [rows[i]["label"]["blocks"] for i in keep]
        ax.plot(x, ours, "o-", label=f"ours ({profile})")
        ax.plot(x, [np.nan if p is None else p for p in paper], "s--", label="paper (COCO)")
        ax.set_xlabel("DyHead blocks")
        ax.set_xticks(x)
    else:
        pos = np.arange(len(keep))
        ax.bar(pos - 0.2, ours, 0.4, label=f"ours ({profile})")
        ax.bar(pos + 0.2, [np.nan if p is None else p for p in paper], 0.4, label="paper (COCO)")
        ax.set_xticks(pos, names, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.7)
    ax.set_ylabel("AP gain over the baseline")
    ax.legend(fontsize=8)
    if flops:
        ax2 = axes[0, 1]
        ours_g = [records[i]["GFLOPs"] for i in keep]
        paper_g = [records[i]["GFLOPs (paper)"] for i in keep]
        x = [rows[i]["label"]["blocks"] for i in keep] if by_blocks else np.arange(len(keep))
        ax2.plot(x, ours_g, "o-", label="ours (counted, COCO 800×1344)")
        ax2.plot(x, [np.nan if p is None else p for p in paper_g], "s--", label="paper")
        ax2.axhline(0, color="k", lw=0.7)
        ax2.set_ylabel("GFLOPs change against the baseline")
        ax2.set_xlabel("DyHead blocks" if by_blocks else "")
        if not by_blocks:
            ax2.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax2.legend(fontsize=8)
    fig.suptitle(f"{name}: {table['title']}", fontsize=9)
    path = plots.save(fig, out or FIGURES / f"gains_{name}.png")
    _log_to_runs(name, matrix, profile, path)
    log(f"wrote {path}")
    return path


PAIRS_TABLE = "table3"  # the convergence figure's second panel: Table 3's detector pairs


def convergence(name: str, profile: str, out: Path | None = None, runs_root: Path = Path("runs"), log=print,
                seeds: int | None = None) -> Path:
    """AP at the curve points of `name`'s rows (the long baseline vs DyHead runs) in the top panel, of Table 3's
    detector pairs in the bottom one: does DyHead's gain hold, grow or close as training goes on?"""
    matrix = load_matrix(profile=profile, seeds=seeds)
    panels = [(t, _table_rows(t, matrix)) for t in (name, PAIRS_TABLE)]
    fig, axes = plots.figure(2, 1, size=(10.0, 7.0))
    colors = plots.plt.get_cmap("tab10")
    for ax, (table, rows) in zip(axes[:, 0], panels):
        labels, drawn, detectors, heads, schedules = matrix.tables[table]["labels"], 0, [], {}, []
        for row in rows:
            exp = row["experiment"]
            path = runs_root / profile / exp / "log.jsonl"
            curve = read_log(path)[1] if path.exists() else []
            if not curve:
                continue
            spec = matrix.experiments[exp]
            detectors += [spec["detector"]] if spec["detector"] not in detectors else []
            schedules += [spec["schedule"]] if spec["schedule"] not in schedules else []
            baseline = spec["head"]["blocks"] == 0
            # a detector's baseline dashed, its first DyHead row solid, a second one (a placement) dotted
            nth = heads[spec["detector"]] = heads.get(spec["detector"], -1) + (0 if baseline else 1)
            ax.plot([r["iteration"] for r in curve], [r["curve_ap"] for r in curve], marker="o", ms=2.5,
                    ls="--" if baseline else ("-" if nth == 0 else ":"),
                    color=colors(detectors.index(spec["detector"]) % 10),
                    label=row_name(row, labels) + (" (baseline)" if baseline else ""))
            drawn += 1
        if not drawn:
            raise DyheadError(f"{table}: no row has AP curve points in its log.jsonl under {runs_root / profile}; "
                              "train them with the profile's `curve` on")
        # the table's title names the paper's schedule; the runs drawn may train a longer one on this profile
        ax.set_title(f"{table}: {matrix.tables[table]['title']}\n{profile}, trained {' and '.join(schedules)}",
                     fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("AP on the curve's val subset (%)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = plots.save(fig, out or FIGURES / "convergence.png")
    for table, _ in panels:
        _log_to_runs(table, matrix, profile, path)
    log(f"wrote {path}")
    return path
