"""Figures: the scale-attention ratios read by hooks, the table figures from run files, the convergence target."""
import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from dyhead.config import load_matrix
from dyhead.engine.visualize import level_ratio, scale_ratios, shown_blocks
from dyhead.modeling.dyhead import DyHead, DyHeadConfig
from tests.helpers import dry_run_jobs, dyhead, snakemake, write_fake_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_ratio_is_the_finer_inputs_weight_over_the_coarser_ones():
    w = {"mid": torch.tensor([0.8]), "low": torch.tensor([0.9]), "high": torch.tensor([0.6])}
    assert level_ratio(w, 0, 5).item() == pytest.approx(0.8 / 0.6)  # finest: own over l+1
    assert level_ratio(w, 2, 5).item() == pytest.approx(0.9 / 0.6)  # inside: l-1 over l+1
    assert level_ratio(w, 4, 5).item() == pytest.approx(0.9 / 0.8)  # coarsest: l-1 over own
    assert shown_blocks(6) == [2, 4, 6] and shown_blocks(1) == [1] and shown_blocks(2) == [1, 2]


def test_scale_ratios_come_from_hooks_on_every_block_and_level():
    torch.manual_seed(0)
    stack = DyHead(DyHeadConfig(blocks=2, channels=8, gn_groups=4, spatial=False)).eval()
    sizes = [(16, 16), (8, 8), (4, 4)]

    def model(images):  # a "detector" that feeds each image's pyramid to the stack
        return stack([torch.randn(len(images), 8, *s) for s in sizes])

    val = [(torch.zeros(3, 8, 8), {}) for _ in range(3)]
    rt = SimpleNamespace(autocast=nullcontext, device=torch.device("cpu"))
    ratios = scale_ratios(model, stack, val, rt, images=None, batch_size=2)
    assert [len(r) for r in ratios] == [3 * 2] * 3  # images x blocks, per level
    assert all(((r >= 0.5) & (r <= 2.0)).all() for r in ratios)
    for block in stack.blocks:  # equal weights on every branch: every ratio is exactly 1
        torch.nn.init.zeros_(block.scale_attn.weight)
        torch.nn.init.constant_(block.scale_attn.bias, 0.7)
    assert all((r == 1.0).all() for r in scale_ratios(model, stack, val, rt, images=2, batch_size=2))
    assert not any(block.scale_attn._forward_hooks for block in stack.blocks)  # hooks removed


def _fake_log(run, steps: int, curve_every: int, ap0: float) -> None:
    lines = [{"iteration": i, "lr": 0.01, "loss": 3.0 / i} for i in range(1, steps + 1)]
    lines += [{"iteration": i, "curve_ap": ap0 + i, "curve_ap50": ap0 + 2 * i} for i in range(curve_every, steps + 1,
                                                                                               curve_every)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(lines, key=lambda r: r["iteration"])))


def test_curves_and_gains_of_a_table_from_its_run_files(repo_copy, monkeypatch):
    monkeypatch.setenv("DYHEAD_TRACKING", "off")
    matrix = load_matrix(profile="mini")
    for i, exp in enumerate(matrix.table_experiments("table2")):
        run = write_fake_run(repo_copy, "mini", exp, 30.0 + i, gmacs=200.0 + 20 * i, spec=matrix.experiments[exp])
        _fake_log(run, 10, 5, 10.0 + i)
    dyhead("figure", "curves", "table2", "--profile", "mini", cwd=repo_copy)
    dyhead("figure", "gains", "table2", "--profile", "mini", cwd=repo_copy)
    for name in ("curves_table2", "gains_table2"):
        assert (repo_copy / f"reports/figures/{name}.png").read_bytes()[:8] == PNG
    proc = dyhead("figure", "curves", "table3", "--profile", "mini", cwd=repo_copy, check=False)  # no logs there
    assert proc.returncode == 2 and proc.stderr.startswith("dyhead: error: table3: no row has a log.jsonl")
    proc = dyhead("figure", "gains", "table4", "--profile", "mini", cwd=repo_copy, check=False)
    assert proc.returncode == 2 and "no baseline rows" in proc.stderr and "\n" not in proc.stderr.strip()


def test_the_convergence_control_is_a_target_of_its_own(repo_copy):
    """Dry run only: the 6x trainings take hours on mini."""
    proc = snakemake("convergence", "-n", "-p", "--cores", "4", "--config", "profile=mini", cwd=repo_copy)
    jobs = dry_run_jobs(proc.stdout + proc.stderr)
    trained = {j["wildcards"].removeprefix("exp=") for j in jobs if j["rule"] == "train"}
    assert {"atss-r50-base-6x", "atss-r50-dyh6-LSC-6x"} <= trained  # 24 epochs on mini
    table3 = load_matrix(profile="mini").table_experiments("table3")
    assert set(table3) <= trained and all(e.endswith("-3x") for e in table3)
    figure = next(j for j in jobs if j["rule"] == "convergence_figure")
    assert figure["shell"] == "dyhead figure convergence convergence --profile mini"
    assert any(j["rule"] == "report" and j["wildcards"] == "table=convergence" for j in jobs)
    everything = snakemake("-n", "--cores", "4", "--config", "profile=mini", cwd=repo_copy)
    assert "6x" not in everything.stdout + everything.stderr  # not part of `all`


def test_the_6x_schedule_leaves_every_earlier_runs_digest_alone(repo_copy):
    import yaml

    from dyhead.config import resolve

    prof = yaml.safe_load((repo_copy / "params/profiles/mini.yaml").read_text())
    del prof["solver"]["schedules"]["6x"]
    (repo_copy / "params/profiles/without6x.yaml").write_text(yaml.safe_dump(prof))
    for exp in ("atss-r50-base-1x", "atss-r50-dyh6-LSC-3x"):
        assert resolve(exp, "mini").digest == resolve(exp, "without6x").digest


def test_convergence_figure_names_the_schedule_and_tells_a_second_dyhead_row_apart(repo_copy, monkeypatch):
    from dyhead.report import figures

    monkeypatch.setenv("DYHEAD_TRACKING", "off")
    monkeypatch.chdir(repo_copy)
    matrix = load_matrix(profile="mini")
    for i, exp in enumerate(matrix.table_experiments("convergence") + matrix.table_experiments("table3")):
        _fake_log(write_fake_run(repo_copy, "mini", exp, 30.0 + i, spec=matrix.experiments[exp]), 10, 5, 10.0 + i)
    drawn = []
    monkeypatch.setattr(figures.plots, "save", lambda fig, path: drawn.append(fig) or path)
    figures.convergence("convergence", "mini", out=repo_copy / "c.png", runs_root=repo_copy / "runs")
    top, bottom = drawn[0].axes[:2]
    assert top.get_title().endswith("mini, trained 6x") and bottom.get_title().endswith("mini, trained 3x")
    style = {line.get_label(): line.get_linestyle() for line in bottom.get_lines()}
    # baseline dashed, DyHead solid, the official placement of the same detector (same colour) dotted
    assert (style["Faster R-CNN (baseline)"], style["Faster R-CNN DyHead"], style["Faster R-CNN ✓ official"]) == \
        ("--", "-", ":")
