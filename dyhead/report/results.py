"""Every run of a profile as one pandas DataFrame (reports/results.csv): what every table and grid renders from.

`collect` reads runs/<profile>/<experiment>/{train,metrics,metrics_tta,flops}.json of each experiment
directory there, each file checked against its schema (dyhead/schemas/run_*.schema.yaml; a file of
another shape is one line naming the file and the key), into one row per run:

    profile, experiment, the experiment's axes (detector ... recipe, config.spec_axes),
    AP ... APl, images, annotations, eval_seconds        metrics.json
    tta_AP ... tta_APl, tta_images, tta_eval_seconds,
    tta_settings (JSON)                                  metrics_tta.json
    gmacs_coco, gmacs_profile                            flops.json (coco model at 800x1344; the profile's own)
    iterations, train_seconds, base_lr, batch_size, clip_grad_norm,
    min_size_train (JSON), parameters, peak_rss_mb,
    machines (' + ' between several)                     train.json

A file not there leaves its columns empty. The frame `collect` returns is the one `read_results` gives
for the CSV it writes (both go through the CSV text), so a report renders the same from either.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from dyhead.config import Matrix, spec_axes, validate
from dyhead.errors import DyheadError
from dyhead.files import load_json, save_text

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
AXIS_COLUMNS = ("detector", "backbone", "head", "blocks", "attentions", "placement", "high_offsets", "schedule",
                "multiscale", "seed", "recipe")
COLUMNS = (("profile", "experiment") + AXIS_COLUMNS + METRICS + ("images", "annotations", "eval_seconds")
           + tuple(f"tta_{m}" for m in METRICS) + ("tta_images", "tta_eval_seconds", "tta_settings")
           + ("gmacs_coco", "gmacs_profile")
           + ("iterations", "train_seconds", "base_lr", "batch_size", "clip_grad_norm", "min_size_train",
              "parameters", "peak_rss_mb", "machines"))
RESULTS_CSV = Path("reports/results.csv")
# which file a column comes from: named when a report needs a value that is not there
SOURCE = {**{m: "metrics.json" for m in METRICS + ("images", "annotations", "eval_seconds")},
          **{c: "metrics_tta.json" for c in COLUMNS if c.startswith("tta_")},
          "gmacs_coco": "flops.json", "gmacs_profile": "flops.json",
          **{c: "train.json" for c in ("iterations", "train_seconds", "base_lr", "batch_size", "clip_grad_norm",
                                       "min_size_train", "parameters", "peak_rss_mb", "machines")}}


def _read(path: Path, schema: str) -> dict | None:
    if not path.exists():
        return None
    data = load_json(path, expect=dict)
    validate(data, schema, path)
    return data


def run_row(profile: str, exp_dir: Path, spec: dict | None) -> dict | None:
    """One run's row; None when the directory holds none of the four files."""
    metrics = _read(exp_dir / "metrics.json", "run_metrics")
    tta = _read(exp_dir / "metrics_tta.json", "run_metrics")
    flops = _read(exp_dir / "flops.json", "run_flops")
    train = _read(exp_dir / "train.json", "run_train")
    if metrics is None and tta is None and flops is None and train is None:
        return None
    if spec is None and train is not None:  # an experiment params/ no longer defines: as it was trained
        spec = train["config"]["spec"]
    row = {"profile": profile, "experiment": exp_dir.name, **(spec_axes(spec) if spec else {})}
    if metrics is not None:
        row.update(metrics["metrics"])
        row.update(images=metrics["images"], annotations=metrics["annotations"], eval_seconds=metrics["eval_seconds"])
    if tta is not None:
        row.update({f"tta_{m}": v for m, v in tta["metrics"].items()})
        row.update(tta_images=tta["images"], tta_eval_seconds=tta["eval_seconds"],
                   tta_settings=json.dumps(tta.get("tta"), sort_keys=True))
    if flops is not None:
        row["gmacs_coco"] = flops["coco"]["gmacs"]
        if profile in flops:
            row["gmacs_profile"] = flops[profile]["gmacs"]
    if train is not None:
        settings = train["config"]["profile_settings"]
        row.update(iterations=train["iterations"], train_seconds=train["train_seconds"],
                   base_lr=settings["solver"]["base_lr"], batch_size=settings["solver"]["batch_size"],
                   clip_grad_norm=settings["solver"].get("clip_grad_norm"),
                   min_size_train=json.dumps(settings["input"]["min_size_train"]),
                   parameters=train.get("parameters"), peak_rss_mb=train.get("peak_rss_mb"),
                   machines=" + ".join(train.get("machines", [])) or None)
    return {k: v for k, v in row.items() if k in COLUMNS}


def collect(profile: str, matrix: Matrix, runs_root: Path = Path("runs")) -> pd.DataFrame:
    """Every run under runs_root/<profile>/, one row each (ordered by experiment id)."""
    rows = []
    base = runs_root / profile
    for exp_dir in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
        row = run_row(profile, exp_dir, matrix.experiments.get(exp_dir.name))
        if row is not None:
            rows.append(row)
    return from_csv_text(pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(index=False))


def from_csv_text(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text))


def read_results(path: Path = RESULTS_CSV) -> pd.DataFrame:
    """reports/results.csv (or any CSV of its columns) as the frame the reports render from."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise DyheadError(f"{path}: file not found (`dyhead results` or any `dyhead report` writes it)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DyheadError(f"{path}: not a results CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in ("profile", "experiment") if c not in frame.columns]
    if missing:
        raise DyheadError(f"{path}: no column {missing[0]!r}")
    return frame


def write_results(frame: pd.DataFrame, path: Path = RESULTS_CSV) -> Path:
    save_text(Path(path), frame.to_csv(index=False))
    return Path(path)


class Runs:
    """A profile's rows of the results frame, looked up by experiment; a value a report needs and the
    frame lacks is one line naming the run file it comes from."""

    def __init__(self, frame: pd.DataFrame, profile: str):
        self.profile = profile
        rows = frame[frame["profile"] == profile]
        self.rows = rows.drop_duplicates("experiment", keep="last").set_index("experiment")

    def has(self, exp: str, column: str) -> bool:
        return exp in self.rows.index and column in self.rows.columns and not pd.isna(self.rows.at[exp, column])

    def get(self, exp: str, column: str, default=DyheadError):
        """The value (a plain Python number or string); `default` when given and the value is missing."""
        if self.has(exp, column):
            value = self.rows.at[exp, column]
            return value.item() if hasattr(value, "item") else value
        if default is not DyheadError:
            return default
        where = f"runs/{self.profile}/{exp}/{SOURCE.get(column, 'metrics.json')}"
        raise DyheadError(f"{where}: not found, or without {column!r} (the report needs it; "
                          f"run `snakemake reports/<table>.md --config profile={self.profile}`)")

    def json(self, exp: str, column: str):
        """A column holding JSON text (tta_settings, min_size_train), decoded."""
        return json.loads(self.get(exp, column))
