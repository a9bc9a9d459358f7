"""Shared pieces of the label converters in ``scripts/`` (YOLO, DOTA -> COCO json)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from detr_ssl.utils.image import image_files


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


def relative_image_files(images_dir: Path) -> list[Path]:
    """Image files under ``images_dir``, relative to it, sorted (their COCO ``file_name``s)."""
    return [path.relative_to(images_dir) for path in image_files(images_dir)]


def orphan_labels(images_dir: Path, labels_dir: Path, images: list[dict]) -> list[Problem]:
    """Warnings for label files under ``labels_dir`` whose image is not among ``images`` (COCO image
    records with paths relative to ``images_dir``): labels that would silently go unused."""
    stems = {Path(image["file_name"]).with_suffix("").as_posix() for image in images}
    return [
        Problem(labels_dir / p, None, f"label file without an image in {images_dir}", fatal=False)
        for p in sorted(q.relative_to(labels_dir) for q in labels_dir.rglob("*.txt"))
        if p.with_suffix("").as_posix() not in stems
    ]


def report_problems(problems: list[Problem], list_all: bool) -> list[Problem]:
    """Print the fatal problems (every one with ``list_all``, i.e. ``--check``) to stderr, one per
    line; returns the fatal ones, which stop the conversion."""
    fatal = [p for p in problems if p.fatal]
    for problem in problems if list_all else fatal:
        print(problem, file=sys.stderr)
    return fatal
