"""Per-epoch schedules for the SSL loss weight and the corruption ratio.

With progress t = epoch / (total_epochs - 1), from 0 at the first epoch to 1 at the last:
    constant: start
    linear:   start * (1 - t)
    cosine:   start * (1 + cos(pi * t)) / 2
so the decaying ones give ``start`` at the first epoch and 0 at the last, the paper's
"decrease the SSL weight over time". A one-epoch run has no decay: its only epoch gets ``start``.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def schedule_value(kind: str, start: float, epoch: int, total_epochs: int) -> float:
    """The value at ``epoch`` (0-based) of a run of ``total_epochs`` epochs."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, {total_epochs}), got {epoch}")
    if kind == "constant" or total_epochs == 1:
        return start
    progress = epoch / (total_epochs - 1)
    if kind == "linear":
        return start * (1.0 - progress)
    return start * 0.5 * (1.0 + math.cos(math.pi * progress))
