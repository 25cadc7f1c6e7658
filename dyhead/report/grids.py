"""reports/grid_<name>.md and .csv: a grid's cells from the results DataFrame, pivoted on its axes.

The CSV holds every cell: its axis values, experiment and baseline experiment, every metric, the AP gain
against the baseline and GFLOPs. The markdown is the pivot of that frame: the grid's `rows` axes down the
side, its `columns` axes across, in each cell AP, its gain and the GFLOPs of the coco-profile model (seeds
a grid leaves out of both are averaged). Like the tables, a pure function of the results frame and params/.
"""
from __future__ import annotations

import pandas as pd

from dyhead.config import Matrix, head_name, load_profile
from dyhead.grids import AVERAGED, AXES
from dyhead.report.results import METRICS, Runs
from dyhead.report.text import (backbone_start, coco_gflops, evaluated_on, fmt, heading, lr_exceptions, machines_note,
                                markdown_table, recipe_note)


def grid_frame(name: str, matrix: Matrix, profile_name: str, results: pd.DataFrame) -> pd.DataFrame:
    """One row per cell of the grid: reports/grid_<name>.csv."""
    grid, runs = matrix.grids[name], Runs(results, profile_name)
    records = []
    for cell in grid["cells"]:
        exp, base = cell["experiment"], cell.get("baseline")
        rec = {**cell["axes"], "experiment": exp, "head": head_name(cell["spec"]), "baseline": base}
        rec.update({m: runs.get(exp, m) for m in METRICS})
        rec["AP gain"] = round(rec["AP"] - runs.get(base, "AP"), 4) if base else None
        rec["GFLOPs"] = runs.get(exp, "gmacs_coco")
        rec[f"GFLOPs ({profile_name})"] = runs.get(exp, "gmacs_profile", None)
        rec["train_seconds"] = runs.get(exp, "train_seconds", None)
        records.append(rec)
    return pd.DataFrame(records, columns=list(AXES) + ["experiment", "head", "baseline", *METRICS, "AP gain", "GFLOPs",
                                                       f"GFLOPs ({profile_name})", "train_seconds"])


def _label(axis: str, value) -> str:
    """A value as a header says it: names as they are, numbers and switches with their axis."""
    return value if isinstance(value, str) else f"{axis} {value}"


def _cell_text(ap: float, gain, gflops: float, is_baseline: bool) -> str:
    gain_text = "" if is_baseline or gain is None or pd.isna(gain) else f" ({fmt(gain, True)})"
    return f"{fmt(ap)}{gain_text} · {gflops:.1f} GF"


def pivot(frame: pd.DataFrame, rows: list[str], columns: list[str]) -> pd.DataFrame:
    """The cells as text, rows x columns in the grid's order of values; '–' where a combination is excluded."""
    frame = frame.assign(is_baseline=frame["experiment"] == frame["baseline"])
    agg = frame.groupby(rows + columns, sort=False).agg(
        AP=("AP", "mean"), gain=("AP gain", "mean"), GFLOPs=("GFLOPs", "mean"), is_baseline=("is_baseline", "all"))
    agg["text"] = [_cell_text(r.AP, r.gain, r.GFLOPs, r.is_baseline) for r in agg.itertuples()]
    agg = agg.reset_index()
    if not columns:
        return agg.set_index(rows)[["text"]].rename(columns={"text": "AP (gain) · GFLOPs"})
    table = agg.pivot(index=rows, columns=columns, values="text")
    order = lambda keys: list(dict.fromkeys(keys))  # noqa: E731 - first appearance = the grid's value order
    row_keys = order(map(tuple, agg[rows].itertuples(index=False)))
    col_keys = order(map(tuple, agg[columns].itertuples(index=False)))
    table = table.reindex(index=[k if len(rows) > 1 else k[0] for k in row_keys],
                          columns=[k if len(columns) > 1 else k[0] for k in col_keys])
    table.columns = [", ".join(_label(a, v) for a, v in zip(columns, k if len(columns) > 1 else (k,)))
                     for k in table.columns]
    return table.fillna("–")


def render_grid(name: str, matrix: Matrix, profile_name: str, results: pd.DataFrame) -> str:
    grid, runs = matrix.grids[name], Runs(results, profile_name)
    profile = load_profile(profile_name)
    frame = grid_frame(name, matrix, profile_name, results)
    rows, columns = grid["rows"], grid["columns"]
    table = pivot(frame, rows, columns)

    first = grid["cells"][0]["experiment"]
    lines = heading(name, grid, kind="Grid")
    baseline = (f"the AP change against the cell's baseline ({', '.join(f'{a}={v}' for a, v in grid['baseline'].items())}, "
                "the other axes its own)" if grid["baseline"] else "")
    averaged = ""
    if AVERAGED in grid["varied"] and AVERAGED not in rows + columns:
        averaged = f" Each cell is the mean over seeds {grid['axes'][AVERAGED]}."
    lines.append(
        f"Ours: profile **{profile_name}** ({profile['description']}); {evaluated_on(runs, first)}. "
        "Each cell: AP in percent"
        + (f", in brackets {baseline}" if baseline else "")
        + f", then GFLOPs ({coco_gflops()}; the same whichever profile trained the models).{averaged} Every cell "
        f"with every metric in reports/grid_{name}.csv."
    )
    lines.append("")
    index = table.index.to_frame(index=False)
    body = [[str(v) for v in index.iloc[i]] + list(table.iloc[i]) for i in range(len(table))]
    lines += markdown_table(list(rows) + list(table.columns), body) + [""]

    exps = matrix.table_experiments(f"grid_{name}")
    shared = [e for e in exps if matrix.tables_of(e)]
    tables = sorted({t for e in shared for t in matrix.tables_of(e)})
    lines.append(f"Experiments: {len(exps)}" + (f", of which {len(shared)} are rows of {', '.join(tables)} too "
                                                 "(the same runs, trained once)" if shared else "") + "."
                 + (f" {len(grid['cells'])} of {_combinations(grid)} combinations are in the grid (params/grids.yaml "
                    "`exclude`)."
                    if len(grid["cells"]) < _combinations(grid) else ""))
    lines.append("")
    solver = profile["solver"]
    schedules = sorted({matrix.experiments[e]["schedule"] for e in exps})
    lines.append(
        f"Training ({profile_name}): " + ", ".join(f"{s} = {solver['schedules'][s]} iterations" for s in schedules
                                                   if s in solver["schedules"])
        + f" at batch {solver['batch_size']}, base lr {solver['base_lr']}, images {profile['input']['min_size_train']} px, "
        f"FPN/head width {profile['model']['fpn_channels']}, {backbone_start(profile)}."
        + lr_exceptions(exps, solver["base_lr"], runs) + recipe_note(exps, matrix) + machines_note(exps, runs)
    )
    lines.append("")
    return "\n".join(lines)


def _combinations(grid: dict) -> int:
    n = 1
    for axis in AXES:
        n *= len(grid["axes"][axis])
    return n
