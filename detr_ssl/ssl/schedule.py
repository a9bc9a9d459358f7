"""Per-step schedules for the SSL loss weight and the corruption ratio.

With progress t = step / total_steps, the fraction of the run's training steps done before this
one (0 at the first step, 1 once the last step is done):
    constant: start
    linear:   start * (1 - t)
    cosine:   start * (1 + cos(pi * t)) / 2
so the decaying ones give ``start`` at the first step and fall smoothly to 0, which they reach
just after the final step: every step of the run, the last epoch's too, still trains with a
positive weight and ratio (the paper's "decrease the SSL weight over time").
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def schedule_value(kind: str, start: float, step: int, total_steps: int) -> float:
    """The value at ``step`` (0-based; ``total_steps`` = the end, after the last step) of a run of
    ``total_steps`` steps."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    if not 0 <= step <= total_steps or total_steps < 1:
        raise ValueError(f"step must be in [0, {total_steps}] with total_steps >= 1, got step {step}")
    if kind == "constant":
        return start
    progress = step / total_steps
    if kind == "linear":
        return start * (1.0 - progress)
    return start * 0.5 * (1.0 + math.cos(math.pi * progress))
