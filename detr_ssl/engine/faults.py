"""Stopping training early without losing work: stop signals and runs of non-finite losses.

Both stop the run between optimizer steps, so the model and optimizer hold exactly the updates
of the batches done so far; the runner checkpoints that state with the position reached, and
``--resume`` continues from the next batch.
"""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import torch

from detr_ssl.utils.dist import max_over_processes

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopTraining(Exception):
    """Training stopped after ``batches`` batches of ``epoch``, all of them applied (or skipped)."""

    def __init__(self, message: str, epoch: int, batches: int, reason: str) -> None:
        super().__init__(message)
        self.epoch, self.batches, self.reason = epoch, batches, reason


class Interrupted(StopTraining):
    """A stop signal arrived; the run saves and stops cleanly."""

    def __init__(self, signum: int, epoch: int, batches: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped after {batches} batches of epoch {epoch}", epoch, batches, name)
        self.signum = signum


class TooManyBadSteps(StopTraining):
    """``--max_bad_steps`` optimizer steps in a row had a non-finite loss; the run saves and fails."""


@dataclass
class BadSteps:
    """Optimizer steps skipped for a non-finite loss: how many in a row (across epochs) and in all."""

    limit: int
    in_a_row: int = 0
    total: int = 0


class StopRequest:
    """The first stop signal this process received, polled by training between optimizer steps."""

    def __init__(self, logger: logging.Logger) -> None:
        self.signum = 0
        self._logger = logger

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: remember the signal; repeats are ignored so the checkpoint write can finish."""
        name = signal.Signals(signum).name
        if self.signum:
            self._logger.warning("%s received: already stopping, the checkpoint is being saved "
                                 "(SIGKILL stops at once)", name)
            return
        self.signum = signum
        self._logger.warning("%s received: finishing the current optimizer step, then saving a checkpoint "
                             "and stopping", name)

    def agreed(self, device: torch.device | str) -> int:
        """The stop signal of any process, 0 for none: every process calls this at the same point
        of training, so all of them stop after the same step."""
        return max_over_processes(self.signum, device)


@contextmanager
def stop_on_signals(logger: logging.Logger) -> Iterator[StopRequest]:
    """Inside the block, SIGTERM and SIGINT request a stop instead of killing the process;
    the previous handlers come back on leaving it. Only the main thread can handle signals:
    elsewhere the request never fires."""
    request = StopRequest(logger)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request.handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
