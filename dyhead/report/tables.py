"""reports/tableN.md (and the controls, reports/<name>.md) from the metrics and FLOPs JSON files; reads nothing else.

Each row prints our number, the paper's and the difference, and the header says which profile
produced ours. The output is a pure function of the JSON inputs, so re-running a target gives an
identical file.
"""
from __future__ import annotations

from pathlib import Path

from dyhead.config import PRETRAINED, Matrix, load_matrix, load_profile, resolve
from dyhead.engine.tracking import log_run_outputs
from dyhead.errors import DyheadError
from dyhead.files import load_json, save_text

PAPER = "Dai et al., *Dynamic Head*, CVPR 2021"


def _fmt(v, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _diff(ours, paper):
    return None if ours is None or paper is None else ours - paper


GROUP_LABEL = "detector"


def _baselines(rows: list[dict], group_label: str | None) -> list[dict]:
    """For each row, the row its gain is measured against: the first row of its group (or of the table)."""
    first: dict = {}
    return [first.setdefault(row["label"][group_label] if group_label else None, row) for row in rows]


def _verdict(rows: list[dict], baseline_of: list[dict], results: dict, profile_name: str) -> str:
    """One sentence, from the numbers: where DyHead raised AP over its detector's baseline here, and where not."""
    helps, hurts, paper_gains = [], [], []
    for row, base in zip(rows, baseline_of):
        if row is base:
            continue
        extra = " ".join(str(v).replace("✓", "").strip() for k, v in row["label"].items() if k != GROUP_LABEL)
        name = f"{row['label'][GROUP_LABEL]} {extra}".strip()
        gain = results[row["experiment"]]["metrics"]["AP"] - results[base["experiment"]]["metrics"]["AP"]
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


def _heading(name: str, table: dict) -> list[str]:
    """'# Table N: title' for the paper's tables; '# Control: title' for ours (any other name), then its note."""
    number = name.removeprefix("table")
    lines = [f"# Table {number}: {table['title']}" if number.isdigit() else f"# Control ({name}): {table['title']}", ""]
    if table.get("note"):
        lines += [table["note"].strip(), ""]
    return lines


def _ours_file(row: dict) -> str:
    return "metrics_tta.json" if row.get("tta") else "metrics.json"


def _ordered(table: dict) -> list[tuple[bool, dict]]:
    """(ours?, row): quoted rows first, then ours, within each `setting` group in order of appearance."""
    items = [(False, r) for r in table.get("literature", [])] + [(True, r) for r in table["rows"]]
    if "setting" not in table["labels"]:
        return items
    groups = list(dict.fromkeys(r["label"]["setting"] for _, r in items))
    return sorted(items, key=lambda item: groups.index(item[1]["label"]["setting"]))  # stable within a group


def render_comparison(name: str, matrix: Matrix, profile_name: str, runs_root: Path = Path("runs")) -> str:
    """Tables 4-5: our DyHead rows beside the paper's, among the other methods it quotes (printed as quoted)."""
    table = matrix.tables[name]
    profile = load_profile(profile_name)
    metrics, labels = table["metrics"], table["labels"]
    runs = runs_root / profile_name
    results = {(r["experiment"], bool(r.get("tta"))): load_json(runs / r["experiment"] / _ours_file(r))
               for r in table["rows"]}
    first = results[(table["rows"][0]["experiment"], bool(table["rows"][0].get("tta")))]
    split = table.get("paper_split", "val2017")
    lines = _heading(name, table)
    lines.append(
        f"Ours: profile **{profile_name}** ({profile['description']}); evaluated on `{first['annotations']}` "
        f"({first['images']} images). Paper: {PAPER}, COCO {split}"
        + (" as scored by the COCO server; ours are not on test-dev (`dyhead evaluate --split test-dev` writes "
           "the server's upload file)" if split == "test-dev" else "")
        + ". Rows marked *quoted* are other methods' results as the paper prints them, not run here. "
        "AP in percent; Δ = ours − paper."
    )
    lines.append("")
    header = list(labels) + ["ours"]
    for m in metrics:
        header += [m, f"{m} (paper)", f"Δ{m}"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for is_ours, row in _ordered(table):
        cells = [str(row["label"].get(k, "")) for k in labels]
        paper = row["paper"]
        if not is_ours:
            cells.append("quoted")
            for m in metrics:
                cells += ["–", _fmt(paper.get(m)), "–"]
        else:
            ours = results[(row["experiment"], bool(row.get("tta")))]["metrics"]
            cells.append(f"`{row['experiment']}`" + (" + TTA" if row.get("tta") else ""))
            for m in metrics:
                cells += [_fmt(ours.get(m)), _fmt(paper.get(m)), _fmt(_diff(ours.get(m), paper.get(m)), True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    solver = profile["solver"]
    trained = []
    for exp in matrix.table_experiments(name):
        train = load_json(runs / exp / "train.json")
        size = train["config"]["profile_settings"]["input"]["min_size_train"]
        size = f"short side {size[0]}–{size[1]} px (multi-scale)" if isinstance(size, list) else f"short side {size} px"
        trained.append(f"`{exp}` {train['iterations']} iterations, {size}")
    schedules = ", ".join(f"{k} = {v}" for k, v in solver["schedules"].items())
    lines.append(f"Training ({profile_name}, batch {solver['batch_size']}, base lr {solver['base_lr']}, "
                 f"{schedules} iterations, {_backbone_start(profile)}): " + "; ".join(trained) + "."
                 + _lr_exceptions(table["rows"], solver["base_lr"], runs))
    lines.append("")
    paper_ap = {(r["experiment"], bool(r.get("tta"))): r["paper"].get("AP") for r in table["rows"]}
    for (exp, tta), rec in results.items():
        if not tta:
            continue
        t = rec["tta"]
        ranges = "per-scale size ranges " + str(t["size_ranges"]) if t["size_ranges"] else "no size ranges"
        text = (f"TTA (`{exp}`): short sides {t['scales']}" + (", each also mirrored" if t["flip"] else "")
                + f", {ranges}, merged by class-wise NMS at IoU {t['nms_thresh']}, best {t['detections_per_img']} "
                f"kept; {rec['eval_seconds']} s for {rec['images']} images.")
        plain = results.get((exp, False))
        if plain is not None:
            gain = _diff(rec["metrics"]["AP"], plain["metrics"]["AP"])
            text += f" It changes AP by {_fmt(gain, True)} here"
            paper_gain = _diff(paper_ap.get((exp, True)), paper_ap.get((exp, False)))
            text += f" (paper: {_fmt(paper_gain, True)})." if paper_gain is not None else "."
        lines += [text, ""]
    return "\n".join(lines)


def render_table(name: str, matrix: Matrix, profile_name: str, runs_root: Path = Path("runs")) -> str:
    table = matrix.tables[name]
    if "literature" in table:  # Tables 4-5: a comparison with quoted methods, not an ablation
        return render_comparison(name, matrix, profile_name, runs_root)
    profile = load_profile(profile_name)
    metrics = table["metrics"]
    results = {}
    for exp in matrix.table_experiments(name):
        results[exp] = load_json(runs_root / profile_name / exp / "metrics.json")
    base_exp = table["rows"][0]["experiment"]
    # A table of detectors (Table 3) pairs each detector's rows with its own baseline (its first row)
    # and prints absolute GFLOPs; the others measure every row against the table's first row.
    grouped = GROUP_LABEL in table["labels"]
    baseline_of = _baselines(table["rows"], GROUP_LABEL if grouped else None)

    lines = _heading(name, table)
    first = results[base_exp]
    lines.append(
        f"Ours: profile **{profile_name}** ({profile['description']}); evaluated on "
        f"`{first['annotations']}` ({first['images']} images). Paper: {PAPER}, COCO val2017. "
        "AP in percent; Δ = ours − paper. "
        + ("Each detector's first row is its baseline; *gain* is the AP change against it."
           if grouped else "The first row is the baseline; *gain* is the AP change against it.")
    )
    lines.append("")

    header = list(table["labels"])
    if table.get("flops"):
        header += ["GFLOPs"] if grouped else ["GFLOPs", "GFLOPs (paper)", "Δ%"]
    header += ["AP gain", "AP gain (paper)"]
    for m in metrics:
        header += [m, f"{m} (paper)", f"Δ{m}"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")

    flops = {}
    if table.get("flops"):
        for exp in matrix.table_experiments(name):
            flops[exp] = load_json(runs_root / profile_name / exp / "flops.json")["coco"]["gmacs"]
    for i, row in enumerate(table["rows"]):
        exp, paper = row["experiment"], row["paper"]
        ours = results[exp]["metrics"]
        cells = [str(row["label"][k]) for k in table["labels"]]
        base_row = baseline_of[i]
        base_ours = results[base_row["experiment"]]["metrics"]["AP"]
        base_paper = base_row["paper"].get("AP")
        if table.get("flops") and grouped:
            cells.append(_fmt(flops[exp]))
        elif table.get("flops"):
            if i == 0:
                ours_g, paper_g = flops[exp], paper.get("GFLOPs")
            else:  # the paper gives the change against the baseline
                ours_g, paper_g = flops[exp] - flops[base_exp], paper.get("GFLOPs")
            rel = None if not paper_g else 100.0 * (ours_g / paper_g - 1)
            cells += [_fmt(ours_g, signed=i > 0), _fmt(paper_g, signed=i > 0), _fmt(rel, signed=True)]
        cells += [_fmt(_diff(ours["AP"], base_ours), True), _fmt(_diff(paper.get("AP"), base_paper), True)]
        for m in metrics:
            cells += [_fmt(ours.get(m)), _fmt(paper.get(m)), _fmt(_diff(ours.get(m), paper.get(m)), True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    if table.get("flops") and grouped:
        lines.append(
            "GFLOPs: multiply-adds of the **coco-profile** model (ResNet-50, 256-channel FPN and head) on one "
            "800×1333 image padded to 800×1344, deformable convs counted, from `dyhead flops`; the same whichever "
            "profile trained the models. Faster R-CNN's count includes its RoI head on a fixed 1000 proposals. "
            "The paper gives no GFLOPs for this table."
        )
        lines.append("")
        lines.append(_verdict(table["rows"], baseline_of, results, profile_name))
        lines.append("")
    elif table.get("flops"):
        lines.append(
            "GFLOPs: multiply-adds of the **coco-profile** model (ResNet-50, 256-channel FPN and head) on one "
            "800×1333 image padded to 800×1344, deformable convs counted, from `dyhead flops`; they need no "
            "training, so they are the same whichever profile trained the models. The baseline row is absolute; "
            "the paper's 254.39 is not reproducible from a standard ATSS R-50 (ours counts that model). The other "
            "rows are the change against the baseline; Δ% compares ours with the paper's change."
        )
        lines.append("")
    if table.get("noise"):
        a, b = table["noise"]
        ap_a, ap_b = results[a]["metrics"]["AP"], results[b]["metrics"]["AP"]
        lines.append(
            f"Run-to-run noise: `{a}` trained twice with different seeds gives AP {_fmt(ap_a)} and {_fmt(ap_b)} "
            f"(|Δ| = {abs(ap_a - ap_b):.2f}). Differences between rows smaller than this are not meaningful."
        )
        lines.append("")
    train = load_json(runs_root / profile_name / base_exp / "train.json")
    lines.append(
        f"Training ({profile_name}): {train['iterations']} iterations at batch "
        f"{profile['solver']['batch_size']}, base lr {profile['solver']['base_lr']}, "
        f"images {profile['input']['min_size_train']} px, FPN/head width {profile['model']['fpn_channels']}, "
        f"{_backbone_start(profile)}."
        + _schedule_note(table, matrix)
        + _lr_exceptions(table["rows"], profile["solver"]["base_lr"], runs_root / profile_name)
    )
    lines.append("")
    return "\n".join(lines)


def _backbone_start(profile: dict) -> str:
    """Where the profile's backbones start: it changes every number, so each report says it."""
    starts = {bb.get("weights") for bb in profile["model"]["backbones"].values()}
    if starts == {PRETRAINED}:
        return "backbones from `dyhead pretrain` (object-crop classification on the training split)"
    if starts == {None}:
        return "backbones from random weights"
    if None not in starts and PRETRAINED not in starts:
        return "backbones from ImageNet weights"
    return "backbones from the weights named in the profile"


def _lr_exceptions(rows: list[dict], base_lr: float, runs: Path) -> str:
    """' Base lr X for ...' and ' Gradient norm clipped at Y for ...' (per-experiment `solver` overrides),
    from the rows' train.json."""
    other, clipped = {}, {}
    for exp in dict.fromkeys(row["experiment"] for row in rows):  # a TTA row repeats its experiment
        solver = load_json(runs / exp / "train.json").get("config", {}).get("profile_settings", {}).get("solver", {})
        lr = solver.get("base_lr", base_lr)
        if lr != base_lr:
            other.setdefault(lr, []).append(f"`{exp}`")
        if "clip_grad_norm" in solver:
            clipped.setdefault(solver["clip_grad_norm"], []).append(f"`{exp}`")
    return ("".join(f" Base lr {lr:g} for {', '.join(exps)}." for lr, exps in other.items())
            + "".join(f" Gradient norm clipped at {c:g} for {', '.join(exps)}." for c, exps in clipped.items()))


def _schedule_note(table: dict, matrix: Matrix) -> str:
    """' Every row trains 3x here (...)' when the profile's `profile_schedule` renamed the table's rows."""
    paper = [row["paper_experiment"] for row in table["rows"] if "paper_experiment" in row]
    if not paper:
        return ""
    schedule = table["profile_schedule"][matrix.profile]
    theirs = sorted({matrix.experiments[e]["schedule"] for e in paper})
    return (f" Every row trains the {schedule} schedule on this profile where the paper trains {', '.join(theirs)} "
            f"(params/tables.yaml `profile_schedule`); on other profiles the rows are `{paper[0]}` and so on.")


def write_table(name: str, matrix: Matrix, profile_name: str, out: Path, runs_root: Path = Path("runs")) -> str:
    text = render_table(name, matrix, profile_name, runs_root)
    save_text(out, text)
    return text


def report(table: str, profile_name: str, out: Path | None = None, log=print) -> Path:
    """`dyhead report`: write the table and attach it to every run it summarises (each run in `mlflow ui`
    links to its table)."""
    matrix = load_matrix(profile=profile_name)
    if table not in matrix.tables:
        raise DyheadError(f"unknown table {table!r}; params/tables.yaml defines {', '.join(sorted(matrix.tables))}")
    out = Path(out or f"reports/{table}.md")
    write_table(table, matrix, profile_name, out)
    for exp in matrix.table_experiments(table):
        run = resolve(exp, profile_name, matrix=matrix)
        if (run.run_dir / "metrics.json").exists():
            log_run_outputs(run, "report", [out], {}, 0)
    log(f"wrote {out} (profile {profile_name})")
    return out
