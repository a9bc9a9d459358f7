"""Whole-detector pre-training methods, behind one registry.

Adding a method: one module with a :class:`DetectorMethod` subclass (read ``base.py``: every hook
it may fill in), and one line in ``METHODS``. It then has its flags in ``main.py --help``, runs
with ``--ssl_method NAME`` (alone or next to an ``--ssl_task``), and its checkpoints start
detection with ``--pretrain``.
"""
from __future__ import annotations

import argparse

from .base import DetectorMethod
from .box_contrast import BoxContrast
from .detreg import DETReg
from .mae import MAE
from .updetr import QueryPatches

__all__ = ["METHODS", "DetectorMethod", "add_method_arguments", "build_method", "method_of_state"]

METHODS: dict[str, type[DetectorMethod]] = {method.name: method for method in (QueryPatches, DETReg, BoxContrast, MAE)}


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Every method's own flags."""
    for method in METHODS.values():
        method.add_arguments(parser)


def build_method(args: argparse.Namespace) -> DetectorMethod | None:
    """The method ``--ssl_method`` names (None for 'none')."""
    if args.ssl_method == "none":
        return None
    return METHODS[args.ssl_method](args)


def method_of_state(state: dict) -> type[DetectorMethod] | None:
    """The method whose pre-training wrote a state dict (recognised by its modules), or None."""
    return next((method for method in METHODS.values() if method.recognises(state)), None)
