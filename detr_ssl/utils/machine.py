"""What a benchmark ran on, for the JSON it prints."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

# Variables that make an AVX-512 machine take PyTorch's / oneDNN's / MKL's AVX2 paths (docs/benchmarks.md):
# MKL, which computes float32 matrix products, ignores the first two.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(gpu: bool | None = None) -> dict[str, Any]:
    """The CPU, the vector instructions PyTorch dispatches to on it (``get_cpu_capability()``: a
    figure means little without it), the ISA variables set, intra-op threads, platform, and the
    GPU (``gpu=None``: the visible one, if any)."""
    use_gpu = torch.cuda.is_available() if gpu is None else gpu
    return {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            **{name: os.environ[name] for name in ISA_VARIABLES if name in os.environ},
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if use_gpu else None}
