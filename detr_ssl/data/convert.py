"""Shared pieces of the label converters in ``scripts/`` (YOLO, DOTA -> COCO json)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One finding about the input; ``fatal`` ones stop the conversion."""

    file: Path
    line: int | None
    message: str
    fatal: bool

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else str(self.file)
        return f"{'error' if self.fatal else 'warning'}: {where}: {self.message}"
