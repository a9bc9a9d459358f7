"""Mixed precision (``--amp``): autocast for the model, float32 for the losses, a scaler for float16.

bfloat16 keeps float32's range, so it needs no loss scaling; float16 does (``GradScaler``).
The criterion always runs in float32 on float32 copies of the outputs: the matcher's costs,
the focal loss and GIoU lose too much in 16 bits.
"""
from __future__ import annotations

import argparse
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_dtype(args: argparse.Namespace, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of this run, or None without ``--amp``.

    ``--amp_dtype auto`` is bfloat16 on CPUs and on GPUs that support it, float16 otherwise.
    """
    if not args.amp:
        return None
    device_type = torch.device(device).type
    if args.amp_dtype != "auto":
        return DTYPES[args.amp_dtype]
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(args: argparse.Namespace, device: torch.device | str) -> AbstractContextManager:
    dtype = amp_dtype(args, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def build_grad_scaler(args: argparse.Namespace, device: torch.device | str) -> torch.amp.GradScaler:
    """A scaler that is active only for float16 (a disabled scaler passes losses and steps through)."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=amp_dtype(args, device) == torch.float16)


def to_float32(outputs: Any) -> Any:
    """Model outputs (nested dicts and lists of tensors) with half-precision tensors made float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if isinstance(outputs, dict):
        return {key: to_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float32(value) for value in outputs)
    return outputs
