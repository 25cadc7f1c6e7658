"""Seeds: each table row trained N times as derived experiments, reported as mean ± std with paired t intervals
on the gains."""
import statistics

import pytest
from scipy.stats import t as t_dist

from dyhead.config import load_matrix, resolve
from tests.helpers import dry_run_jobs, dyhead, snakemake, write_fake_run


def test_seeds_add_derived_runs_to_every_row_and_default_to_one(repo_copy):
    plain = load_matrix(profile="mini")
    rows = [r["experiment"] for r in plain.tables["table2"]["rows"]]
    assert plain.seeds == 1 and plain.table_experiments("table2") == rows + ["atss-r50-dyh6-LSC-1x-seed1"]
    three = load_matrix(profile="mini", seeds=3)
    exps = three.table_experiments("table2")
    for exp in rows:
        assert three.seed_runs(exp) == [exp, f"{exp}-seed1", f"{exp}-seed2"]
        assert set(three.seed_runs(exp)) <= set(exps)
    # the noise pair's second run is seed 1 of the 6-block row: trained once
    assert exps.count("atss-r50-dyh6-LSC-1x-seed1") == 1
    # a derived run resolves without the matrix knowing it (jobs run `dyhead train <id>-seed2` plainly)
    run = resolve("atss-r50-base-1x-seed2", "mini")
    assert run.seed == 2 and run.digest != resolve("atss-r50-base-1x", "mini").digest


def _cell(ours: list[float], base: list[float]) -> tuple[str, str]:
    """What the table should print, computed here with statistics + scipy."""
    diffs = [a - b for a, b in zip(ours, base)]
    gain, half = statistics.mean(diffs), t_dist.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    mark = " *" if gain - half > 0 or gain + half < 0 else ""
    return (f"{statistics.mean(ours):.2f} ± {statistics.stdev(ours):.2f}",
            f"{gain:+.2f} [{gain - half:+.2f}, {gain + half:+.2f}]{mark}")


def test_the_report_prints_mean_std_and_paired_intervals(repo_copy, monkeypatch):
    monkeypatch.setenv("DYHEAD_TRACKING", "off")
    matrix = load_matrix(profile="mini", seeds=3)
    aps = {0: [30.0, 31.0, 32.0], 1: [29.0, 30.5, 31.0], 2: [31.0, 31.0, 33.5]}
    for row in matrix.tables["table2"]["rows"]:
        blocks = row["label"]["blocks"]
        for k, exp in enumerate(matrix.seed_runs(row["experiment"])):
            ap = aps.get(blocks, [34.0, 35.0, 35.5])[k]
            write_fake_run(repo_copy, "mini", exp, ap, spec=matrix.experiments[exp])
    write_fake_run(repo_copy, "mini", "atss-r50-dyh6-LSC-1x-seed1", 35.0,
                   spec=matrix.experiments["atss-r50-dyh6-LSC-1x-seed1"])
    dyhead("report", "table2", "--profile", "mini", "--seeds", "3", cwd=repo_copy)
    text = (repo_copy / "reports/table2.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    for blocks, ours in ((1, aps[1]), (2, aps[2]), (6, [34.0, 35.0, 35.5])):
        mean_std, gain = _cell(ours, aps[0])
        assert mean_std in rows[str(blocks)], (blocks, rows[str(blocks)])
        assert gain in rows[str(blocks)], (blocks, rows[str(blocks)])
    assert rows["6"][-2].endswith(" *")  # +4 AP on every seed: beyond the noise
    assert not _cell(aps[2], aps[0])[1].endswith("*")  # +1, 0, +1.5: within it
    assert "mean ± standard deviation over 3 seeds" in text and "paired" in text


def test_seeds_on_the_command_line_train_the_derived_runs(repo_copy):
    proc = snakemake("reports/table2.md", "-n", "-p", "--cores", "4", "--config", "profile=tiny", "seeds=2",
                     cwd=repo_copy)
    jobs = dry_run_jobs(proc.stdout + proc.stderr)
    trained = {j["wildcards"].removeprefix("exp=") for j in jobs if j["rule"] == "train"}
    assert {"atss-r50-base-1x-seed1", "atss-r50-dyh10-LSC-1x-seed1", "atss-r50-dyh10-LSC-1x"} <= trained
    report = next(j for j in jobs if j["rule"] == "report")
    assert "--seeds 2" in report["shell"]
    plain = dry_run_jobs(snakemake("reports/table2.md", "-n", "-p", "--cores", "4", "--config", "profile=tiny",
                                   cwd=repo_copy).stdout)
    assert "--seeds" not in next(j for j in plain if j["rule"] == "report")["shell"]


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_a_bad_seed_count_is_one_line(repo_copy, bad):
    proc = dyhead("report", "table2", "--profile", "mini", "--seeds", bad, cwd=repo_copy, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"dyhead: error: seeds {bad}: must be at least 1"
