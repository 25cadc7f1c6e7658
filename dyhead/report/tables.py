"""reports/tableN.md, .csv and .html (and the controls', reports/<name>.*) from the results DataFrame alone.

The markdown shows, per row, ours beside the paper's for the table's main metrics (`main_metrics`,
default AP) and the gain against the baseline row, ours and the paper's; reports/<table>.csv holds the
wide form (every metric, ours, the paper's, ours − paper, the gains). The header says which profile
produced ours. The output is a pure function of the results frame (dyhead/report/results.py) and params/,
so re-running a target gives an identical file, and a results.csv alone rebuilds every table.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from scipy.stats import t as t_dist

from dyhead.config import GRID_PREFIX, RECIPES, Matrix, load_matrix, load_profile, resolve
from dyhead.engine.tracking import log_run_outputs
from dyhead.errors import DyheadError
from dyhead.files import save_text
from dyhead.plots import html_page
from dyhead.report import grids as grid_report
from dyhead.report.results import RESULTS_CSV, Runs, collect, write_results
from dyhead.report.text import (PAPER, backbone_start, coco_gflops, diff, evaluated_on, fmt, heading, lr_exceptions,
                                machines_note, markdown_table, recipe_note)

GROUP_LABEL = "detector"
DEFAULT_MAIN = ["AP"]


def _r(v, digits: int = 4):
    """A computed number as the CSV stores it (no float noise such as 5.100000000000001)."""
    return None if v is None else round(v, digits)


def baselines(rows: list[dict], group_label: str | None) -> list[dict]:
    """For each row, the row its gain is measured against: the first row of its group (or of the table)."""
    first: dict = {}
    return [first.setdefault(row["label"][group_label] if group_label else None, row) for row in rows]


def _verdict(rows: list[dict], baseline_of: list[dict], runs: Runs, profile_name: str) -> str:
    """One sentence, from the numbers: where DyHead raised AP over its detector's baseline here, and where not."""
    helps, hurts, paper_gains = [], [], []
    for row, base in zip(rows, baseline_of):
        if row is base:
            continue
        extra = " ".join(str(v).replace("✓", "").strip() for k, v in row["label"].items() if k != GROUP_LABEL)
        name = f"{row['label'][GROUP_LABEL]} {extra}".strip()
        gain = runs.get(row["experiment"], "AP") - runs.get(base["experiment"], "AP")
        (helps if gain > 0 else hurts).append(f"{name} ({gain:+.2f})")
        if row["paper"].get("AP") is not None and base["paper"].get("AP") is not None:
            paper_gains.append(row["paper"]["AP"] - base["paper"]["AP"])
    said = f"On the {profile_name} data DyHead raises AP over the detector's own baseline for "
    said += (", ".join(helps) if helps else "none of the detectors")
    said += "; it does not for " + (", ".join(hurts) if hurts else "none") + "."
    if paper_gains:
        said += (f" The paper reports a gain for every detector ({min(paper_gains):+.1f} to {max(paper_gains):+.1f} AP "
                 "on COCO). Each of our rows is one training run with one seed, so small differences are within noise.")
    return said


def seed_stats(ours: list[float], base: list[float], level: float = 0.95) -> dict:
    """Mean and standard deviation of a row's per-seed values, and its gain over the baseline as the mean of
    the per-seed differences (seed k of the row minus seed k of the baseline: paired, since a seed fixes the
    data order and the starting weights of both) with its two-sided t interval over the seeds."""
    values, diffs = pd.Series(ours, dtype=float), pd.Series(ours, dtype=float) - pd.Series(base, dtype=float)
    n = len(diffs)
    half = t_dist.ppf(0.5 + level / 2, n - 1) * diffs.std(ddof=1) / n ** 0.5 if n > 1 else float("nan")
    gain = diffs.mean()
    return {"mean": values.mean(), "std": values.std(ddof=1), "gain": gain, "lo": gain - half, "hi": gain + half}


def trend_line(records: list[dict], baseline_of: list[dict], rows: list[dict], metric: str = "AP") -> str:
    """One line: in how many rows our gain over the baseline has the paper's sign, and the Spearman rank
    correlation of our gains with the paper's (pandas), over the rows that have both."""
    pairs = pd.DataFrame([(rec[f"{metric} gain"], rec[f"{metric} gain (paper)"])
                          for rec, row, base in zip(records, rows, baseline_of) if row is not base],
                         columns=["ours", "paper"], dtype=float).dropna()
    if pairs.empty:
        return f"Trend vs the paper: no row has both our {metric} gain and the paper's."
    agree = int((np_sign(pairs["ours"]) == np_sign(pairs["paper"])).sum())
    distinct = len(pairs) >= 3 and pairs["ours"].nunique() > 1 and pairs["paper"].nunique() > 1  # else undefined
    rho = pairs["ours"].corr(pairs["paper"], method="spearman") if distinct else float("nan")
    rank = (f"Spearman rank correlation of the gains {rho:+.2f}" if rho == rho
            else "rank correlation needs 3 rows with distinct gains")
    return (f"Trend vs the paper: our {metric} gain has the paper's sign in {agree} of {len(pairs)} rows; "
            f"{rank}.")


def np_sign(values: pd.Series) -> pd.Series:
    """-1, 0 or +1; a gain within 0.05 AP (the tables' rounding) counts as 0."""
    return values.where(values.abs() >= 0.05, 0.0).apply(lambda v: (v > 0) - (v < 0))


def _ours_prefix(row: dict) -> str:
    return "tta_" if row.get("tta") else ""


def _ordered(table: dict) -> list[tuple[bool, dict]]:
    """(ours?, row): quoted rows first, then ours, within each `setting` group in order of appearance."""
    items = [(False, r) for r in table.get("literature", [])] + [(True, r) for r in table["rows"]]
    if "setting" not in table["labels"]:
        return items
    groups = list(dict.fromkeys(r["label"]["setting"] for _, r in items))
    return sorted(items, key=lambda item: groups.index(item[1]["label"]["setting"]))  # stable within a group


# -- Tables 4-5: our rows among the methods the paper quotes -----------------------------------------------

def comparison_records(table: dict, runs: Runs) -> list[dict]:
    """Every row of a comparison table, quoted ones included, with every metric (the wide form)."""
    records = []
    for is_ours, row in _ordered(table):
        rec = {**{k: row["label"].get(k, "") for k in table["labels"]},
               "ours": "quoted", "experiment": None, "tta": False}
        if is_ours:
            rec.update(ours=f"`{row['experiment']}`" + (" + TTA" if row.get("tta") else ""),
                       experiment=row["experiment"], tta=bool(row.get("tta")))
        for m in table["metrics"]:
            ours = runs.get(row["experiment"], _ours_prefix(row) + m) if is_ours else None
            paper = row["paper"].get(m)
            rec.update({m: ours, f"{m} (paper)": paper, f"Δ{m}": _r(diff(ours, paper))})
        records.append(rec)
    return records


def render_comparison(name: str, matrix: Matrix, profile_name: str, results: pd.DataFrame) -> str:
    """Tables 4-5: our DyHead rows beside the paper's, among the other methods it quotes (printed as quoted)."""
    table, runs = matrix.tables[name], Runs(results, profile_name)
    profile = load_profile(profile_name)
    main = table.get("main_metrics", DEFAULT_MAIN)
    first = table["rows"][0]
    split = table.get("paper_split", "val2017")
    lines = heading(name, table)
    lines.append(
        f"Ours: profile **{profile_name}** ({profile['description']}); {evaluated_on(runs, first['experiment'])}. "
        f"Paper: {PAPER}, COCO {split}"
        + (" as scored by the COCO server; ours are not on test-dev (`dyhead evaluate --split test-dev` writes "
           "the server's upload file)" if split == "test-dev" else "")
        + ". Rows marked *quoted* are other methods' results as the paper prints them, not run here. "
        f"AP in percent; every metric, and ours − paper, in reports/{name}.csv."
    )
    lines.append("")
    header = list(table["labels"]) + ["ours"] + [c for m in main for c in (m, f"{m} (paper)")]
    body = [[str(rec[k]) for k in table["labels"]] + [rec["ours"]]
            + [fmt(rec[c]) for m in main for c in (m, f"{m} (paper)")] for rec in comparison_records(table, runs)]
    lines += markdown_table(header, body) + [""]

    solver = profile["solver"]
    trained = []
    for exp in matrix.table_experiments(name):
        size = runs.json(exp, "min_size_train")
        size = f"short side {size[0]}–{size[1]} px (multi-scale)" if isinstance(size, list) else f"short side {size} px"
        trained.append(f"`{exp}` {runs.get(exp, 'iterations')} iterations, {size}")
    schedules = ", ".join(f"{k} = {v}" for k, v in solver["schedules"].items())
    lines.append(f"Training ({profile_name}, batch {solver['batch_size']}, base lr {solver['base_lr']}, "
                 f"{schedules} iterations, {backbone_start(profile)}): " + "; ".join(trained) + "."
                 + lr_exceptions([r["experiment"] for r in table["rows"]], solver["base_lr"], runs)
                 + recipe_note([r["experiment"] for r in table["rows"]], matrix)
                 + machines_note([r["experiment"] for r in table["rows"]], runs))
    lines.append("")
    paper_ap = {(r["experiment"], bool(r.get("tta"))): r["paper"].get("AP") for r in table["rows"]}
    for row in table["rows"]:
        if not row.get("tta"):
            continue
        exp = row["experiment"]
        t = runs.json(exp, "tta_settings")
        ranges = "per-scale size ranges " + str(t["size_ranges"]) if t["size_ranges"] else "no size ranges"
        text = (f"TTA (`{exp}`): short sides {t['scales']}" + (", each also mirrored" if t["flip"] else "")
                + f", {ranges}, merged by class-wise NMS at IoU {t['nms_thresh']}, best {t['detections_per_img']} "
                f"kept; {runs.get(exp, 'tta_eval_seconds')} s for {runs.get(exp, 'tta_images')} images.")
        if runs.has(exp, "AP"):
            text += f" It changes AP by {fmt(diff(runs.get(exp, 'tta_AP'), runs.get(exp, 'AP')), True)} here"
            paper_gain = diff(paper_ap.get((exp, True)), paper_ap.get((exp, False)))
            text += f" (paper: {fmt(paper_gain, True)})." if paper_gain is not None else "."
        lines += [text, ""]
    return "\n".join(lines)


# -- Tables 1-3 and the controls: rows against a baseline ------------------------------------------------

def ablation_records(name: str, matrix: Matrix, runs: Runs) -> list[dict]:
    """Every row with every metric: ours, the paper's, ours − paper, the gain against its baseline row
    (ours and the paper's), and GFLOPs where the table has them."""
    table = matrix.tables[name]
    grouped = GROUP_LABEL in table["labels"]
    baseline_of = baselines(table["rows"], GROUP_LABEL if grouped else None)
    base_exp = table["rows"][0]["experiment"]
    records = []
    for i, row in enumerate(table["rows"]):
        exp, paper, base = row["experiment"], row["paper"], baseline_of[i]
        rec = {**{k: row["label"][k] for k in table["labels"]}, "experiment": exp}
        if table.get("flops") and grouped:
            rec["GFLOPs"] = runs.get(exp, "gmacs_coco")
        elif table.get("flops"):  # the baseline absolute, the others as the change against it, as the paper
            ours_g = runs.get(exp, "gmacs_coco") - (runs.get(base_exp, "gmacs_coco") if i else 0.0)
            paper_g = paper.get("GFLOPs")
            rec.update({"GFLOPs": _r(ours_g), "GFLOPs (paper)": paper_g,
                        "ΔGFLOPs %": _r(None if not paper_g else 100.0 * (ours_g / paper_g - 1))})
        for m in table["metrics"]:
            ours = runs.get(exp, m)
            gain = diff(ours, runs.get(base["experiment"], m))
            if matrix.seeds > 1:  # the mean over the row's seed runs; the gain paired by seed with the baseline's
                stats = seed_stats([runs.get(e, m) for e in matrix.seed_runs(exp)],
                                   [runs.get(e, m) for e in matrix.seed_runs(base["experiment"])])
                ours, gain = stats["mean"], stats["gain"]
                rec.update({f"{m} std": _r(stats["std"]), f"{m} gain lo": _r(stats["lo"]),
                            f"{m} gain hi": _r(stats["hi"])})
            rec.update({m: _r(ours), f"{m} (paper)": paper.get(m), f"Δ{m}": _r(diff(ours, paper.get(m))),
                        f"{m} gain": _r(gain), f"{m} gain (paper)": _r(diff(paper.get(m), base["paper"].get(m)))})
        records.append(rec)
    return records


def render_table(name: str, matrix: Matrix, profile_name: str, results: pd.DataFrame) -> str:
    """The markdown of a table from the results frame of `profile_name`'s runs."""
    if name not in matrix.tables:
        raise DyheadError(f"unknown table {name!r}; params/tables.yaml defines {', '.join(sorted(matrix.tables))}")
    table = matrix.tables[name]
    if "literature" in table:  # Tables 4-5: a comparison with quoted methods, not an ablation
        return render_comparison(name, matrix, profile_name, results)
    runs = Runs(results, profile_name)
    profile = load_profile(profile_name)
    main = table.get("main_metrics", DEFAULT_MAIN)
    base_exp = table["rows"][0]["experiment"]
    # A table of detectors (Table 3) pairs each detector's rows with its own baseline (its first row)
    # and prints absolute GFLOPs; the others measure every row against the table's first row.
    grouped = GROUP_LABEL in table["labels"]
    records = ablation_records(name, matrix, runs)

    lines = heading(name, table)
    lines += [trend_line(records, baselines(table["rows"], GROUP_LABEL if grouped else None), table["rows"]), ""]
    lines.append(
        f"Ours: profile **{profile_name}** ({profile['description']}); {evaluated_on(runs, base_exp)}. "
        f"Paper: {PAPER}, COCO val2017. AP in percent; "
        + ("each detector's first row is its baseline, *gain* the change against it"
           if grouped else "the first row is the baseline, *gain* the change against it")
        + f", ours and the paper's. Every metric, and ours − paper, in reports/{name}.csv."
    )
    lines.append("")

    gflops = [] if not table.get("flops") else ["GFLOPs"] if grouped else ["GFLOPs", "GFLOPs (paper)", "ΔGFLOPs %"]
    metric_cols = [c for m in main for c in (m, f"{m} (paper)", f"{m} gain", f"{m} gain (paper)")]
    header = list(table["labels"]) + [c.replace("ΔGFLOPs %", "Δ%") for c in gflops] + metric_cols
    body = []
    for i, rec in enumerate(records):
        cells = [str(rec[k]) for k in table["labels"]]
        cells += [fmt(rec[c], signed=(c == "ΔGFLOPs %" or (i > 0 and not grouped))) for c in gflops]
        cells += [seeded_cell(rec, c) if matrix.seeds > 1 else fmt(rec[c], signed="gain" in c) for c in metric_cols]
        body.append(cells)
    lines += markdown_table(header, body) + [""]
    if matrix.seeds > 1:
        lines.append(
            f"Ours: the mean ± standard deviation over {matrix.seeds} seeds per row (`<experiment>`, "
            f"`<experiment>-seed1` … `-seed{matrix.seeds - 1}`). A gain is the mean of the per-seed differences with "
            "the baseline trained with the same seed (paired: a seed fixes the data order and the starting weights), "
            f"with its 95% t interval over the {matrix.seeds} differences in brackets; * marks a gain whose interval "
            "excludes 0 (larger than the seed-to-seed noise).")
        lines.append("")

    if table.get("flops") and grouped:
        lines.append(
            f"GFLOPs: {coco_gflops('ResNet-50, ')}; the same whichever profile trained the models. Faster R-CNN's "
            "count includes its RoI head on a fixed 1000 proposals. The paper gives no GFLOPs for this table."
        )
        lines.append("")
        lines.append(_verdict(table["rows"], baselines(table["rows"], GROUP_LABEL), runs, profile_name))
        lines.append("")
    elif table.get("flops"):
        lines.append(
            f"GFLOPs: {coco_gflops('ResNet-50, ')}; they need no training, so they are the same whichever profile "
            "trained the models. The baseline row is absolute; the paper's 254.39 is not reproducible from a "
            "standard ATSS R-50 (ours counts that model). The other rows are the change against the baseline; Δ% "
            "compares ours with the paper's change." + _kernel_note(table, matrix)
        )
        lines.append("")
    if table.get("noise"):
        a, b = table["noise"]
        ap_a, ap_b = runs.get(a, "AP"), runs.get(b, "AP")
        lines.append(
            f"Run-to-run noise: `{a}` trained twice with different seeds gives AP {fmt(ap_a)} and {fmt(ap_b)} "
            f"(|Δ| = {abs(ap_a - ap_b):.2f}). Differences between rows smaller than this are not meaningful."
        )
        lines.append("")
    exps = [row["experiment"] for row in table["rows"]]
    lines.append(
        f"Training ({profile_name}): {runs.get(base_exp, 'iterations')} iterations at batch "
        f"{profile['solver']['batch_size']}, base lr {profile['solver']['base_lr']}, "
        f"images {profile['input']['min_size_train']} px, FPN/head width {profile['model']['fpn_channels']}, "
        f"{backbone_start(profile)}."
        + _schedule_note(table, matrix)
        + lr_exceptions(exps, profile["solver"]["base_lr"], runs)
        + recipe_note(exps, matrix)
        + machines_note(matrix.table_experiments(name), runs)
    )
    lines.append("")
    return "\n".join(lines)


def seeded_cell(rec: dict, column: str) -> str:
    """'31.20 ± 0.40' for ours, '+1.20 [+0.30, +2.10] *' for our gain (the interval excludes 0); the paper's as they are."""
    if column.endswith("(paper)"):
        return fmt(rec[column], signed="gain" in column)
    if column.endswith(" gain"):
        lo, hi = rec.get(f"{column} lo"), rec.get(f"{column} hi")
        if lo is None or hi is None or rec[column] is None:
            return fmt(rec[column], signed=True)
        mark = " *" if lo > 0 or hi < 0 else ""
        return f"{fmt(rec[column], True)} [{fmt(lo, True)}, {fmt(hi, True)}]{mark}"
    std = rec.get(f"{column} std")
    return fmt(rec[column]) if std is None else f"{fmt(rec[column])} ± {std:.2f}"


def _kernel_note(table: dict, matrix: Matrix) -> str:
    """Which rows count 1x1 predictor convs (a recipe's), where the paper's numbers count 3x3 ones."""
    ones = [row["experiment"] for row in table["rows"]
            if RECIPES[matrix.experiments[row["experiment"]].get("recipe", "paper")].pred_kernel == 1]
    if not ones:
        return ""
    return (f" {', '.join(f'`{e}`' for e in ones)} counts its 1×1 predictor convs (the official recipe); the other "
            "rows count 3×3 ones, as the paper's changes do.")


def _schedule_note(table: dict, matrix: Matrix) -> str:
    """' Every row trains 3x here (...)' when the profile's `profile_schedule` renamed the table's rows."""
    paper = [row["paper_experiment"] for row in table["rows"] if "paper_experiment" in row]
    if not paper:
        return ""
    schedule = table["profile_schedule"][matrix.profile]
    theirs = sorted({matrix.experiments[e]["schedule"] for e in paper})
    return (f" Every row trains the {schedule} schedule on this profile where the paper trains {', '.join(theirs)} "
            f"(params/tables.yaml `profile_schedule`); on other profiles the rows are `{paper[0]}` and so on.")


def table_frame(name: str, matrix: Matrix, profile_name: str, results: pd.DataFrame) -> pd.DataFrame:
    """The wide form of a table: reports/<table>.csv."""
    runs = Runs(results, profile_name)
    table = matrix.tables[name]
    records = comparison_records(table, runs) if "literature" in table else ablation_records(name, matrix, runs)
    return pd.DataFrame(records)


# -- the `dyhead report` command ---------------------------------------------------------------------------

def render(name: str, matrix: Matrix, profile_name: str, results: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """A table's or a grid's markdown and CSV frame."""
    if name.startswith(GRID_PREFIX) and name.removeprefix(GRID_PREFIX) in matrix.grids:
        grid = name.removeprefix(GRID_PREFIX)
        return (grid_report.render_grid(grid, matrix, profile_name, results),
                grid_report.grid_frame(grid, matrix, profile_name, results))
    if name not in matrix.tables:
        raise DyheadError(f"unknown table {name!r}; params/ defines {', '.join(matrix.reports)}")
    return render_table(name, matrix, profile_name, results), table_frame(name, matrix, profile_name, results)


def report(table: str, profile_name: str, out: Path | None = None, log=print, runs_root: Path = Path("runs"),
           results_csv: Path = RESULTS_CSV, seeds: int | None = None) -> Path:
    """`dyhead report`: every run of the profile into reports/results.csv, then the table (or grid_<name>)
    from it: reports/<name>.md and .csv, the markdown attached to every run it summarises (each run in
    `mlflow ui` links to its table)."""
    matrix = load_matrix(profile=profile_name, seeds=seeds)
    if table not in matrix.reports:
        raise DyheadError(f"unknown table {table!r}; params/ defines {', '.join(matrix.reports)}")
    out = Path(out or f"reports/{table}.md")
    results = collect(profile_name, matrix, runs_root)
    text, frame = render(table, matrix, profile_name, results)
    write_results(results, results_csv)
    save_text(out.with_suffix(".csv"), frame.to_csv(index=False))
    save_text(out.with_suffix(".html"), html_page(text, table))  # what Snakemake's HTML report shows
    save_text(out, text)
    for exp in matrix.table_experiments(table):
        run = resolve(exp, profile_name, matrix=matrix)
        if (run.run_dir / "metrics.json").exists():
            log_run_outputs(run, "report", [out], {}, 0)
    log(f"wrote {out}, {out.with_suffix('.csv')}, {out.with_suffix('.html')} and {results_csv} (profile {profile_name})")
    return out


def write_table(name: str, matrix: Matrix, profile_name: str, out: Path, results: pd.DataFrame) -> str:
    """reports/<name>.md and .csv from a results frame (e.g. one read back from a results.csv)."""
    text, frame = render(name, matrix, profile_name, results)
    save_text(Path(out).with_suffix(".csv"), frame.to_csv(index=False))
    save_text(Path(out), text)
    return text
