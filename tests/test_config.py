"""params/ loading: the real files validate; every bad key or value gives one line naming it."""

import pytest
import yaml

from dyhead.config import canonical_id, load_matrix, load_profile, profile_names, resolve
from dyhead.errors import DyheadError
from tests.helpers import dyhead, snakemake


def edit(path, fn):
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_shipped_params_validate(repo_copy):
    matrix = load_matrix()
    for name in profile_names():
        load_profile(name)
    t1, t2 = set(matrix.table_experiments("table1")), set(matrix.table_experiments("table2"))
    # shared rows are trained once: Table 1's all-off row is the baseline, its all-on row the 6-block model
    assert t1 & t2 == {"atss-r50-base-1x", "atss-r50-dyh6-LSC-1x", "atss-r50-dyh6-LSC-1x-seed1"}
    mini = load_matrix(profile="mini")  # Table 2's official-recipe row runs on coco only
    assert len(mini.tables["table1"]["rows"]) == 8 and len(mini.tables["table2"]["rows"]) == 7
    assert [r["label"]["blocks"] for r in mini.tables["table2"]["rows"]] == [0, 1, 2, 4, 6, 8, 10]
    assert len(matrix.tables["table2"]["rows"]) == 8  # without a profile, every row


def test_canonical_ids():
    assert canonical_id({"detector": "atss", "backbone": "r50", "schedule": "1x", "head": {"blocks": 0}}) == "atss-r50-base-1x"
    spec = {"detector": "atss", "backbone": "r50", "schedule": "1x", "head": {"blocks": 6, "task": False}, "seed": 2}
    assert canonical_id(spec) == "atss-r50-dyh6-LS-1x-seed2"


def test_unknown_profile_key_is_named(repo_copy):
    edit(repo_copy / "params/profiles/mini.yaml", lambda d: d["solver"].update(base_lrr=0.1))
    with pytest.raises(DyheadError, match=r"mini.yaml: solver: Additional properties .*'base_lrr'"):
        load_profile("mini")


def test_bad_value_is_named(repo_copy):
    edit(repo_copy / "params/profiles/mini.yaml", lambda d: d["runtime"].update(dcn_backend="cuda-magic"))
    with pytest.raises(DyheadError, match=r"runtime.dcn_backend: 'cuda-magic' is not one of"):
        load_profile("mini")


def test_unknown_detector_is_named(repo_copy):
    edit(repo_copy / "params/experiments.yaml",
         lambda d: d["experiments"]["atss-r50-base-1x"].update(detector="yolo"))
    with pytest.raises(DyheadError, match=r"experiments.atss-r50-base-1x.detector: 'yolo' is not one of"):
        load_matrix()


def test_mislabelled_experiment_id_is_refused(repo_copy):
    edit(repo_copy / "params/experiments.yaml",
         lambda d: d["experiments"]["atss-r50-dyh2-LSC-1x"]["head"].update(blocks=3))
    with pytest.raises(DyheadError, match="expected 'atss-r50-dyh3-LSC-1x'"):
        load_matrix()


def test_table_row_with_unknown_experiment(repo_copy):
    edit(repo_copy / "params/tables.yaml", lambda d: d["table2"]["rows"][1].update(experiment="atss-r50-dyh3-LSC-1x"))
    with pytest.raises(DyheadError, match=r"table2.rows.1.experiment: unknown experiment"):
        load_matrix()


def test_unknown_experiment_and_profile(repo_copy):
    with pytest.raises(DyheadError, match="unknown experiment 'atss-r50-dyh7-LSC-1x'; did you mean"):
        resolve("atss-r50-dyh7-LSC-1x")
    with pytest.raises(DyheadError, match="unknown profile 'huge'"):
        resolve("atss-r50-base-1x", "huge")


def test_broken_yaml_names_file_and_line(repo_copy):
    (repo_copy / "params/tables.yaml").write_text("table1: [unclosed\n")
    with pytest.raises(DyheadError, match=r"tables.yaml: not valid YAML \(line \d+\)"):
        load_matrix()


def test_cli_prints_one_line_error(repo_copy):
    proc = dyhead("train", "nope-r50-base-1x", cwd=repo_copy, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("dyhead: error: unknown experiment 'nope-r50-base-1x'")


def test_snakemake_fails_before_any_job_on_a_bad_key(repo_copy):
    edit(repo_copy / "params/profiles/mini.yaml", lambda d: d["model"].update(fpn_chanels=64))
    proc = snakemake("-n", "--cores", "1", "reports/table2.md", cwd=repo_copy, check=False)
    assert proc.returncode != 0
    assert "fpn_chanels" in proc.stderr + proc.stdout
    assert "rule train" not in proc.stdout


def test_training_priorities_order_the_longest_first_on_every_profile():
    """Snakemake starts the trainings by dyhead.costs' priority: the deeper heads first (a 1-block head costs about the baseline's tower head), the same order (and the
    same numbers) whether a profile's 1x is 1000 iterations, 2 or 90k."""
    from dyhead.costs import train_priority

    def priorities(profile):
        matrix = load_matrix(profile=profile)
        schedules = load_profile(profile)["solver"]["schedules"]
        rows = [r["experiment"] for r in matrix.tables["table2"]["rows"] if r["experiment"] in matrix.experiments]
        return {exp: train_priority(matrix.experiments[exp], schedules[matrix.experiments[exp]["schedule"]],
                                    schedules["1x"]) for exp in rows}

    mini = priorities("mini")
    dyh = [p for e, p in mini.items() if "-dyh" in e and "seed" not in e]  # 1, 2, 4, 6, 8, 10 blocks
    assert dyh == sorted(dyh) and len(set(dyh)) == len(dyh) and max(mini.values()) == dyh[-1]
    assert mini["atss-r50-base-1x"] == 110 and mini["atss-r50-dyh10-LSC-1x"] == 136
    for profile in ("cocolike", "coco"):
        assert {e: p for e, p in priorities(profile).items() if e in mini} == mini, profile
    # a longer schedule of the same model goes before it
    spec = load_matrix(profile="mini").experiments["atss-r50-base-1x"]
    assert train_priority(spec, 3000, 1000) > train_priority(spec, 1000, 1000) > 50  # above every evaluation
