"""What every figure shares: matplotlib without a display, and PNGs written atomically.

    fig, ax = plots.figure(1, 2)
    ...
    plots.save(fig, Path("reports/figures/x.png"))
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # jobs run on nodes without a display; set before pyplot is imported anywhere

import matplotlib.pyplot as plt  # noqa: E402

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
