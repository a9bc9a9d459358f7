"""Errors a user can fix: the command line prints them as one line (``error: ...``, exit code 2)
instead of a traceback; ``--debug`` shows the traceback too.

Each one also derives from the built-in exception of its kind, so that ``except ValueError`` and
``except FileNotFoundError`` keep catching them.
"""
from __future__ import annotations

from typing import NoReturn


class UserError(Exception):
    """A mistake in the run's input (a flag, a file, the data) whose message says what to do."""


class ConfigError(UserError, ValueError):
    """Flags that cannot work together, found once the data or the device is known."""


def config_error(message: str) -> NoReturn:
    """Raise ``ConfigError(message)``: for checks that take an ``error`` callback (argparse's is ``parser.error``)."""
    raise ConfigError(message)


class DataError(UserError, ValueError):
    """Annotations or images that cannot be used as they are."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the run needs is not there."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` without the traceback text that DataLoader workers prepend when they
    re-raise an error of a worker process in the main one."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message
