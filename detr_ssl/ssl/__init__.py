"""Self-supervised pretext tasks on the encoder tokens, behind one registry.

Adding a task: one module with a ``PretextTask`` subclass, and one line in ``TASKS``.
"""
from __future__ import annotations

from detr_ssl.ssl.base import PretextTask, SSLTargets
from detr_ssl.ssl.jigsaw import JigsawContinuous, JigsawDiscrete
from detr_ssl.ssl.mim import MIMContinuous, MIMDiscrete
from detr_ssl.ssl.reconstruction import Reconstruction
from detr_ssl.ssl.schedule import SCHEDULES, schedule_value
from detr_ssl.ssl.tokenizer import Tokenizer, load_tokenizer

__all__ = ["TASKS", "SCHEDULES", "PretextTask", "SSLTargets", "Tokenizer", "build_pretext_task", "load_tokenizer",
           "schedule_value"]

TASKS: dict[str, type[PretextTask]] = {
    task.name: task
    for task in (Reconstruction, MIMContinuous, MIMDiscrete, JigsawContinuous, JigsawDiscrete)
}


def build_pretext_task(name: str, hidden_dim: int, patch_size: int, ratio: float,
                       tokenizer_path: str | None = None) -> PretextTask | None:
    """The task called ``name`` (None for "none"), its tokenizer loaded when it uses one."""
    if name == "none":
        return None
    if name not in TASKS:
        raise ValueError(f"unknown SSL task {name!r}; known: none, {', '.join(TASKS)}")
    task = TASKS[name]
    tokenizer = load_tokenizer(tokenizer_path) if task.uses_tokenizer and tokenizer_path else None
    return task(hidden_dim, patch_size, ratio, tokenizer)
