"""Saving figures the same way everywhere: PNG (for looking) and PDF (for papers), headless."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts and tests run without a display
import matplotlib.pyplot as plt


def save_figure(figure, path_stem: Path) -> list[Path]:
    """Write `<path_stem>.png` and `<path_stem>.pdf`, close the figure, return both paths."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".pdf")]
    figure.savefig(paths[0], dpi=150, bbox_inches="tight")
    figure.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})  # rebuilds leave git clean
    plt.close(figure)
    return paths
