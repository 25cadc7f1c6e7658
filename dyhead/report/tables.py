"""reports/tableN.md from the metrics and FLOPs JSON files; reads nothing else.

Each row prints our number, the paper's and the difference, and the header says which profile
produced ours. The output is a pure function of the JSON inputs, so re-running a target gives an
identical file.
"""
from __future__ import annotations

from pathlib import Path

from dyhead.config import Matrix, load_profile
from dyhead.engine.checkpoint import load_json, save_text

PAPER = "Dai et al., *Dynamic Head*, CVPR 2021"


def _fmt(v, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _diff(ours, paper):
    return None if ours is None or paper is None else ours - paper


def render_table(name: str, matrix: Matrix, profile_name: str, runs_root: Path = Path("runs")) -> str:
    table = matrix.tables[name]
    profile = load_profile(profile_name)
    metrics = table["metrics"]
    results = {}
    for exp in matrix.table_experiments(name):
        results[exp] = load_json(runs_root / profile_name / exp / "metrics.json")
    base_exp = table["rows"][0]["experiment"]
    base_ours = results[base_exp]["metrics"]["AP"]
    base_paper = table["rows"][0]["paper"]["AP"]

    lines = [f"# {name.capitalize().replace('table', 'Table ')}: {table['title']}", ""]
    first = results[base_exp]
    lines.append(
        f"Ours: profile **{profile_name}** ({profile['description']}); evaluated on "
        f"`{first['annotations']}` ({first['images']} images). Paper: {PAPER}, COCO val2017. "
        "AP in percent; Δ = ours − paper. The first row is the baseline; *gain* is the AP change against it."
    )
    lines.append("")

    header = list(table["labels"])
    if table.get("flops"):
        header += ["GFLOPs", "GFLOPs (paper)", "Δ%"]
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
        if table.get("flops"):
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

    if table.get("flops"):
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
        f"images {profile['input']['min_size_train']} px, FPN/head width {profile['model']['fpn_channels']}."
    )
    lines.append("")
    return "\n".join(lines)


def write_table(name: str, matrix: Matrix, profile_name: str, out: Path, runs_root: Path = Path("runs")) -> str:
    text = render_table(name, matrix, profile_name, runs_root)
    save_text(out, text)
    return text
