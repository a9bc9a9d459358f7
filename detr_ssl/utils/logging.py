"""Console and file logging, TensorBoard scalars and running means of the losses."""
from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from detr_ssl.utils.dist import is_main_process

LOGGER_NAME = "detr_ssl"


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm, so that log lines do not tear an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(output_dir: str | None, rank: int) -> logging.Logger:
    """Configure the 'detr_ssl' logger: console everywhere, ``OUTPUT_DIR/log.txt`` on rank 0.

    Rank 0 logs INFO; the other ranks only WARNING and above, tagged with their rank, so that a
    multi-GPU run prints each message once. Calling it again replaces the handlers.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    tag = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [_TqdmHandler(sys.stdout)]
    if output_dir and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "log.txt"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


class TensorBoardLogger:
    """Scalars to ``OUTPUT_DIR/tensorboard`` on the main process.

    On other ranks, without an output directory or with ``enabled=False`` it writes nothing,
    so callers never need to check.
    """

    def __init__(self, output_dir: str | None, enabled: bool = True) -> None:
        active = enabled and bool(output_dir) and is_main_process()
        self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard")) if active else None

    def scalars(self, values: Mapping[str, float | Tensor], step: int, prefix: str = "") -> None:
        """Write each value under the tag ``prefix/key``."""
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}" if prefix else key, float(value), step)

    def images(self, tag: str, grid: Tensor, step: int, rows: int) -> None:
        """Write (N, 3, H, W) images in [0, 1] as one grid with ``rows`` rows."""
        if self.writer is None:
            return
        self.writer.add_image(tag, make_grid(grid.float().clamp(0, 1), nrow=max(1, len(grid) // rows)), step)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MetricTracker:
    """Running means of named scalars (the loss dict) over an epoch or any other window."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def update(self, values: Mapping[str, float | Tensor]) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
            self._counts[key] = self._counts.get(key, 0) + 1

    def summary(self) -> dict[str, float]:
        return {key: total / self._counts[key] for key, total in self._sums.items()}

    def format(self) -> str:
        """``'loss 1.2345  loss_ce 0.4321 ...'``: one line for the console and the log."""
        return "  ".join(f"{key} {mean:.4f}" for key, mean in self.summary().items())
