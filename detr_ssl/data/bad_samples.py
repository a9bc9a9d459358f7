"""Bad input: the errors that name it, and ``--skip_bad_samples``, which skips it and says so.

Without the flag a bad image or record stops the run with an error naming the file and the
record. With it, bad records are dropped when the dataset is scanned (one summary in the log)
and an image that fails to load is replaced by the next good one; the batch carries the
messages under ``target['skipped']``, and the engine logs them at the end of the epoch. So
nothing is dropped without a line in the log.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from detr_ssl.utils.errors import UserError

SKIPPED = "skipped"  # target key: messages about the bad samples replaced by this one

Sample = tuple[Any, dict[str, Any]]


class BadSampleError(UserError):
    """One image or record that cannot be used; the message names the file and the record."""


class MissingImageError(BadSampleError, FileNotFoundError):
    """The json lists an image whose file is not there."""


class UnreadableImageError(BadSampleError, OSError):
    """The image file exists but does not decode (truncated, corrupt, not an image)."""


class ImageSizeError(BadSampleError, ValueError):
    """The image's pixel size differs from the ``width``/``height`` its json gives."""


def first_good(load: Callable[[int], Sample], index: int, length: int) -> Sample:
    """``load(index)``; if that sample is bad, the next good one after it (wrapping around).

    The target of the sample returned lists the bad ones under ``'skipped'``. The choice depends
    only on the index, so an epoch with bad images is still reproducible and resumable.
    """
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for {length} images")  # also ends iteration over a dataset
    skipped: list[str] = []
    for step in range(length):
        try:
            image, target = load((index + step) % length)
        except BadSampleError as err:
            skipped.append(str(err))
            continue
        if skipped:
            target = {**target, SKIPPED: skipped}
        return image, target
    raise BadSampleError(f"--skip_bad_samples: all {length} images are bad, nothing is left to load; "
                         f"the first: {skipped[0] if skipped else 'none'}")


def skipped_in(targets: Iterable[dict[str, Any]]) -> list[str]:
    """The skip messages a batch carries."""
    return [message for target in targets for message in target.get(SKIPPED, ())]


def log_skipped(logger: logging.Logger, where: str, messages: Iterable[str]) -> None:
    """One warning that counts and lists the bad samples skipped (each named once)."""
    unique = sorted(set(messages))
    if unique:
        logger.warning("%s: --skip_bad_samples skipped %d bad image(s), each replaced by the next good one:\n%s",
                       where, len(unique), "\n".join(f"  {message}" for message in unique))
