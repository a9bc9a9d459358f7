"""Mixed precision (``--amp``): autocast for the model, float32 for the losses, a scaler for float16.

bfloat16 keeps float32's range, so it needs no loss scaling; float16 does (``GradScaler``).
The criterion always runs in float32 on float32 copies of the outputs: the matcher's costs,
the focal loss and GIoU lose too much in 16 bits.
"""
from __future__ import annotations

import argparse
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# What bfloat16 autocast cost on a CPU that emulates it, as measured on a 2-core AVX2 EPYC (issue 17):
# a DETR-R50 step 79.6 s instead of 5.5 s, a small model 2.1x.
EMULATED_BF16_COST = ("2-19x slower than float32 (a DETR-R50 step: 79.6 s instead of 5.5 s on an AVX2 EPYC, "
                      "34.4 s instead of 1.84 s on an AVX-512 EPYC's AVX2 path)")


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX) and PyTorch and oneDNN
    may use it: ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` can cap them below it (e.g. to
    emulate an AVX2 machine), and without it bfloat16 is emulated, several times slower."""
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    onednn = isa in ("ALL", "DEFAULT") or "BF16" in isa or "AMX" in isa
    return hardware and onednn and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def amp_dtype(args: argparse.Namespace, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of this run, or None (float32) without ``--amp``.

    ``--amp_dtype auto`` is bfloat16 on GPUs that support it (float16 on the others) and on CPUs
    with native bfloat16; on a CPU without it, where bfloat16 is emulated and slower than
    float32, ``auto`` runs float32: ``--amp`` never slows a run down. An explicit dtype is used as given.
    """
    if not args.amp:
        return None
    device_type = torch.device(device).type
    if args.amp_dtype != "auto":
        return DTYPES[args.amp_dtype]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bfloat16() else None


def is_emulated_bfloat16(args: argparse.Namespace, device: torch.device | str) -> bool:
    """Whether this run autocasts to bfloat16 on a CPU that only emulates it (slow: worth a warning)."""
    return (amp_dtype(args, device) == torch.bfloat16 and torch.device(device).type == "cpu"
            and not cpu_has_native_bfloat16())


def describe_precision(args: argparse.Namespace, device: torch.device | str) -> str | None:
    """The log line saying what ``--amp`` does on this device, or None without ``--amp``."""
    if not args.amp:
        return None
    dtype = amp_dtype(args, device)
    if dtype is None:
        return (f"--amp: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16 (AVX512-BF16 or "
                "AMX), where autocast would be slower than float32: running float32 (--amp_dtype bfloat16 forces it)")
    name = str(dtype).replace("torch.", "")
    if is_emulated_bfloat16(args, device):
        return f"mixed precision: autocast to {name}, EMULATED on this CPU: expect {EMULATED_BF16_COST}"
    return f"mixed precision: autocast to {name}"


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
