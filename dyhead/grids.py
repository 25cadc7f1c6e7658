"""Grids: experiments as the cross product of axes (params/grids.yaml), each reported as one pivot table.

A grid lists values per axis (detector, backbone, blocks, attentions, placement, high_offsets, schedule,
multiscale, seed, recipe); every combination not excluded is one experiment, named by the rule of
params/experiments.yaml (config.canonical_id). A combination whose id a file already defines is that
experiment, trained once and with its own settings; one only a grid names takes its detector's
`detector_defaults` from params/experiments.yaml (RetinaNet's half lr), so it trains as the paper's rows of
that detector do. `dyhead list --grid NAME` prints the expansion; reports/grid_<name>.md pivots its results
(dyhead/report/grids.py).
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path

from dyhead.config import SCHEMAS, canonical_id, load_yaml, spec_problem, validate
from dyhead.errors import DyheadError

AXES = ("detector", "backbone", "blocks", "attentions", "placement", "high_offsets", "schedule", "multiscale",
        "seed", "recipe")
# an axis a grid leaves out has one value: the full DyHead block as the paper trains it on ResNet-50
AXIS_DEFAULTS = {"backbone": "r50", "blocks": 6, "attentions": "LSC", "placement": "paper",
                 "high_offsets": "resample", "schedule": "1x", "multiscale": False, "seed": 0, "recipe": "paper"}
AVERAGED = "seed"  # the one axis a pivot may leave out of its rows and columns: its cells are averaged


def axis_values() -> dict[str, list]:
    """The values the experiments schema allows for the enumerated axes: one list to extend per new
    detector or backbone."""
    props = load_yaml(SCHEMAS / "experiments.schema.yaml")["properties"]["experiments"]
    props = props["additionalProperties"]["properties"]
    enums = {key: props[key]["enum"] for key in ("detector", "backbone", "placement", "schedule", "recipe")}
    enums["high_offsets"] = props["head"]["properties"]["high_offsets"]["enum"]
    return enums


def spec_of(combo: dict) -> dict:
    """The experiment fields of one combination of axis values (only what differs from the defaults, as
    params/experiments.yaml writes them). A baseline head (blocks 0) has no attentions, offsets or placement."""
    spec = {"detector": combo["detector"], "backbone": combo["backbone"], "schedule": combo["schedule"],
            "head": {"blocks": combo["blocks"]}}
    if combo["blocks"] > 0:
        for key, letter in (("scale", "L"), ("spatial", "S"), ("task", "C")):
            if letter not in combo["attentions"]:
                spec["head"][key] = False
        if combo["high_offsets"] != "resample":
            spec["head"]["high_offsets"] = combo["high_offsets"]
        if combo["placement"] != "paper":
            spec["placement"] = combo["placement"]
    if combo["multiscale"]:
        spec["multiscale"] = True
    if combo["recipe"] != "paper":
        spec["recipe"] = combo["recipe"]
    if combo["seed"]:
        spec["seed"] = combo["seed"]
    return spec


def describe(combo: dict, axes: list[str]) -> str:
    """'detector=atss, blocks=6' over `axes`."""
    return ", ".join(f"{a}={combo[a]}" for a in axes)


def _excluded(combo: dict, rule: dict) -> bool:
    return all(combo[a] in (v if isinstance(v, list) else [v]) for a, v in rule.items())


def _check_values(grid: dict, axes: dict, where: str) -> None:
    """Every value named is one the axis may take, and one the grid lists where a rule refers to it."""
    enums = axis_values()
    for axis, values in grid["axes"].items():
        for i, value in enumerate(values):
            if axis in enums and value not in enums[axis]:
                raise DyheadError(f"{where}.axes.{axis}.{i}: {value!r} is not one of {enums[axis]}")
    for i, rule in enumerate(grid.get("exclude", [])):
        for axis, value in rule.items():
            for v in value if isinstance(value, list) else [value]:
                if v not in axes[axis]:
                    raise DyheadError(f"{where}.exclude.{i}.{axis}: {v!r} is not a value of the grid's {axis} axis "
                                      f"{axes[axis]}")
    for axis, value in grid.get("baseline", {}).items():
        if value not in axes[axis]:
            raise DyheadError(f"{where}.baseline.{axis}: {value!r} is not a value of the grid's {axis} axis {axes[axis]}")


def _layout(grid: dict, axes: dict, where: str) -> tuple[list[str], list[str]]:
    """The pivot's row and column axes: every axis with several values in one of them (seeds may be averaged)."""
    rows = list(grid["rows"])
    varied = [a for a in AXES if len(axes[a]) > 1]
    columns = list(grid["columns"]) if "columns" in grid else [a for a in varied if a not in rows and a != AVERAGED]
    both = sorted(set(rows) & set(columns))
    if both:
        raise DyheadError(f"{where}.columns: {both[0]} is in rows too")
    for axis in varied:
        if axis not in rows + columns and axis != AVERAGED:
            raise DyheadError(f"{where}: axis {axis} has {len(axes[axis])} values; put it in rows or columns")
    return rows, columns


def expand_grid(name: str, grid: dict, path: Path, experiments: dict, defaults: dict) -> dict:
    """The grid with every axis filled in and its cells: one per combination not excluded, each with its
    experiment id, spec and (with a `baseline`) the experiment its gain is measured against."""
    where = f"{path}: grids.{name}"
    axes = {a: list(grid["axes"].get(a, [AXIS_DEFAULTS.get(a)])) for a in AXES}
    _check_values(grid, axes, where)
    rows, columns = _layout(grid, axes, where)
    varied = [a for a in AXES if len(axes[a]) > 1]
    exclude = grid.get("exclude", [])
    cells = []
    for values in itertools.product(*(axes[a] for a in AXES)):
        combo = dict(zip(AXES, values))
        if any(_excluded(combo, rule) for rule in exclude):
            continue
        spec = spec_of(combo)
        problem = spec_problem(spec)
        if problem:
            raise DyheadError(f"{where}: {describe(combo, varied)} is no experiment ({problem[0]} {problem[1]}); "
                              "add it to exclude")
        exp = canonical_id(spec)
        if exp in experiments:  # the same experiment as a table's row: its own settings, trained once
            spec = experiments[exp]
        else:
            spec = {**spec, **copy.deepcopy(defaults.get(spec["detector"], {}))}
        cells.append({"axes": combo, "experiment": exp, "spec": spec})
    if not cells:
        raise DyheadError(f"{where}.exclude: excludes every combination of the axes; nothing would run")
    baseline = grid.get("baseline", {})
    if baseline:
        made = {c["experiment"] for c in cells}
        for cell in cells:
            base = {**cell["axes"], **baseline}
            cell["baseline"] = canonical_id(spec_of(base))
            if cell["baseline"] not in made:
                raise DyheadError(f"{where}.baseline: {describe(base, varied)}, the baseline of "
                                  f"{describe(cell['axes'], varied)}, is excluded")
    return {"title": grid["title"], "note": grid.get("note", ""), "axes": axes, "varied": varied, "rows": rows,
            "columns": columns, "baseline": baseline, "cells": cells}


def load_grids(root: Path, experiments: dict, defaults: dict) -> dict:
    """params/grids.yaml expanded, grid by grid; no file, no grids."""
    path = root / "params" / "grids.yaml"
    if not path.exists():
        return {}
    data = load_yaml(path)
    validate(data, "grids", path)
    return {name: expand_grid(name, grid, path, experiments, defaults) for name, grid in data["grids"].items()}
