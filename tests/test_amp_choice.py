"""--amp never slows a run: on a CPU without native bfloat16 ``--amp_dtype auto`` runs float32 and
says why; an explicit bfloat16 runs as asked, with a warning of its cost (capability faked)."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from detr_ssl.engine import amp


def amp_args(dtype: str = "auto", on: bool = True) -> argparse.Namespace:
    return argparse.Namespace(amp=on, amp_dtype=dtype)


@pytest.mark.parametrize("native", [True, False], ids=["native_bf16", "emulated_bf16"])
def test_auto_picks_bfloat16_only_where_the_cpu_computes_it(monkeypatch, native):
    monkeypatch.setattr(amp, "cpu_has_native_bfloat16", lambda: native)
    assert amp.amp_dtype(amp_args(), "cpu") == (torch.bfloat16 if native else None)
    assert amp.amp_dtype(amp_args("bfloat16"), "cpu") == torch.bfloat16  # as asked
    assert amp.amp_dtype(amp_args(on=False), "cpu") is None
    line = amp.describe_precision(amp_args(), "cpu")
    assert ("no native bfloat16" in line and "running float32" in line) != native
    forced = amp.describe_precision(amp_args("bfloat16"), "cpu")
    assert ("EMULATED" in forced and "slower than float32" in forced) != native
    assert not amp.build_grad_scaler(amp_args(), "cpu").is_enabled()


def test_an_avx2_capped_process_has_no_native_bfloat16():
    """ATEN_CPU_CAPABILITY=avx2 with ONEDNN_MAX_CPU_ISA=AVX2 (an emulated AVX2 machine) takes the float32 path."""
    code = ("import torch; from detr_ssl.engine.amp import cpu_has_native_bfloat16; "
            "print(torch.backends.cpu.get_cpu_capability(), cpu_has_native_bfloat16())")
    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AVX2", "False"]
