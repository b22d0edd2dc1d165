"""Learning-rate schedule: linear warm-up, plateau, then a ramp-down to a floor."""
from __future__ import annotations

import math

RAMPDOWN_TYPES = ("cosine", "linear", "step")


def validate_schedule(warmup_length: float, rampdown_start: float, rampdown_stop: float,
                      rampdown_type: str, max_epochs: int) -> None:
    """Raise ValueError naming the offending key before any training starts."""
    if rampdown_type not in RAMPDOWN_TYPES:
        raise ValueError(f"rampdown_type={rampdown_type!r} is not one of {', '.join(RAMPDOWN_TYPES)}")
    if warmup_length < 0:
        raise ValueError(f"warmup_length={warmup_length:g} must be >= 0 (epochs)")
    if rampdown_stop < rampdown_start:
        raise ValueError(f"rampdown_stop={rampdown_stop:g} comes before rampdown_start={rampdown_start:g}")
    if rampdown_start < warmup_length:
        raise ValueError(f"rampdown_start={rampdown_start:g} is inside the warm-up (warmup_length={warmup_length:g})")
    if max_epochs < 1:
        raise ValueError(f"max_epochs={max_epochs} must be >= 1")


def learning_rate(epoch: float, peak_lr: float, min_lr: float, warmup_length: float,
                  rampdown_start: float, rampdown_stop: float, rampdown_type: str) -> float:
    """Learning rate at a fractional epoch.

    0 -> peak_lr linearly over `warmup_length` epochs, peak until `rampdown_start`, then down to
    `min_lr` at `rampdown_stop` (cosine, linear, or a staircase that drops once per whole epoch),
    `min_lr` afterwards.
    """
    if epoch < warmup_length:
        return peak_lr * epoch / warmup_length
    if epoch < rampdown_start:
        return peak_lr
    if epoch >= rampdown_stop:
        return min_lr
    if rampdown_type == "step":
        epoch = math.floor(epoch)
    progress = (epoch - rampdown_start) / (rampdown_stop - rampdown_start)
    if rampdown_type == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif rampdown_type in ("linear", "step"):
        remaining = 1.0 - progress
    else:
        raise ValueError(f"rampdown_type={rampdown_type!r} is not one of {', '.join(RAMPDOWN_TYPES)}")
    return min_lr + (peak_lr - min_lr) * remaining


def learning_rate_factor(step: int, steps_per_epoch: float, peak_lr: float, min_lr: float, warmup_length: float,
                         rampdown_start: float, rampdown_stop: float, rampdown_type: str) -> float:
    """`learning_rate` at an optimiser step, relative to `peak_lr` (the form LambdaLR multiplies by)."""
    epoch = step / steps_per_epoch
    return learning_rate(epoch, peak_lr, min_lr, warmup_length, rampdown_start, rampdown_stop,
                         rampdown_type) / peak_lr


def save_schedule_plot(peak_lrs: dict[str, float], min_lr: float, warmup_length: float, rampdown_start: float,
                       rampdown_stop: float, rampdown_type: str, max_epochs: int, path) -> None:
    """PNG of each parameter group's learning rate over the run."""
    from utils.figures import pyplot, save_figure

    plt = pyplot()
    epochs = [max_epochs * step / 1000 for step in range(1001)]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for name, peak in peak_lrs.items():
        axis.plot(epochs, [learning_rate(epoch, peak, min(min_lr, peak), warmup_length, rampdown_start,
                                         rampdown_stop, rampdown_type) for epoch in epochs], label=name)
    axis.set(xlabel="epoch", ylabel="learning rate", yscale="log",
             title=f"warm-up {warmup_length}, {rampdown_type} ramp-down {rampdown_start}-{rampdown_stop}")
    axis.legend(fontsize="small")
    figure.tight_layout()
    save_figure(figure, path)
