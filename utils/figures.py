"""PNG figures written whole or not at all."""
from __future__ import annotations

import os
from pathlib import Path


def save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> None:
    """Writes a matplotlib figure to a temporary file, then renames it over `path`, and closes the figure."""
    import matplotlib.pyplot as plt

    partial = Path(f"{path}.partial.png")
    try:
        figure.savefig(partial, dpi=dpi)
        os.replace(partial, path)
    finally:
        plt.close(figure)
        partial.unlink(missing_ok=True)


def pyplot():
    """matplotlib's pyplot on the Agg back end (no display needed), imported only where a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
