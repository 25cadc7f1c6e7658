"""What every figure and report page shares: matplotlib without a display, PNGs written atomically, and
markdown turned into a standalone HTML page (Snakemake's HTML report shows images and HTML inline).

    fig, ax = plots.figure(1, 2)
    ...
    plots.save(fig, Path("reports/figures/x.png"))
    save_text(Path("reports/table2.html"), plots.html_page(markdown_text, "table2"))
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # jobs run on nodes without a display; set before pyplot is imported anywhere

import matplotlib.pyplot as plt  # noqa: E402

from markdown_it import MarkdownIt  # noqa: E402

from dyhead.files import atomic_write  # noqa: E402

DPI = 110
# PNG metadata without the version string, so the same data draws the same bytes on any matplotlib patch release
METADATA = {"Software": None}


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] | None = None, **kw):
    """A new figure and its axes (always a 2-D array, squeeze=False)."""
    size = size or (4.2 * cols, 3.2 * rows)
    return plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained", **kw)


def save(fig, path: Path) -> Path:
    """The figure as a PNG at `path` (temporary name, then renamed); the figure is closed."""
    path = Path(path)
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI, metadata=METADATA))
    finally:
        plt.close(fig)
    return path


STYLE = ("body{font-family:sans-serif;font-size:14px;max-width:70em;margin:1em}"
         "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}")


def html_page(markdown: str, title: str) -> str:
    """A markdown report (GitHub tables) as one self-contained HTML page."""
    body = MarkdownIt("commonmark").enable("table").render(markdown)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>\n{body}</body></html>\n")
