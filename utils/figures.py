"""PNG figures written whole or not at all."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from utils.files import replaced_atomically
from utils.metrics import AUDIO_TO_TEXT, METRIC_NAMES


def save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> None:
    """Writes a matplotlib figure whole or not at all, and closes it."""
    try:
        with replaced_atomically(path) as temporary:
            figure.savefig(temporary, dpi=dpi)
    finally:
        pyplot().close(figure)


def pyplot():
    """matplotlib's pyplot on the Agg back end (no display needed), imported only where a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def logged_curves(metrics_csv: Path) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
    """From Lightning's CSV log: (step, training loss) pairs, and per validation metric (epoch, value) pairs."""
    loss, validation = [], {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("train/loss"):
                loss.append((int(row["step"]), float(row["train/loss"])))
            for name, value in row.items():
                if name.startswith("val/") and value:
                    validation.setdefault(name, []).append((int(row["epoch"]) + 1, float(value)))
    return loss, validation


def save_training_curves(metrics_csv: Path, path: Path) -> Path:
    """PNG of the training loss per logged step and the validation metrics after each epoch."""
    loss, validation = logged_curves(metrics_csv)
    plt = pyplot()
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 3.5))
    if loss:
        loss_axis.plot(*zip(*loss))
    else:  # Lightning logs the loss every log_every_n_steps steps; a shorter run has none
        loss_axis.text(0.5, 0.5, "no training loss logged:\nfewer steps than log_every_n_steps", ha="center",
                       va="center", transform=loss_axis.transAxes)
    loss_axis.set(xlabel="step", ylabel="training loss", title="training loss")
    order = [f"val/{direction}{name}" for direction in ("", AUDIO_TO_TEXT) for name in METRIC_NAMES]
    for name, points in sorted(validation.items(), key=lambda item: (order.index(item[0]) if item[0] in order
                                                                      else len(order), item[0])):
        label = name.removeprefix("val/")
        metric = label.removeprefix(AUDIO_TO_TEXT)  # one colour per metric, dashed for audio to text
        metric_axis.plot(*zip(*points), marker="o", markersize=3, label=label,
                         color=f"C{METRIC_NAMES.index(metric)}" if metric in METRIC_NAMES else None,
                         linestyle="--" if label.startswith(AUDIO_TO_TEXT) else "-")
    metric_axis.set(xlabel="epoch", ylabel="validation", title="validation metrics")
    if validation:
        metric_axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the lines
    figure.tight_layout()
    save_figure(figure, path)
    return path
