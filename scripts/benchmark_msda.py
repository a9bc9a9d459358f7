"""Time ms_deform_attn's back ends, forward and forward + backward, and print JSON.

    python scripts/benchmark_msda.py                      # every available back end, float32
    python scripts/benchmark_msda.py --dtype float16      # CUDA only

Default shapes are the official Deformable DETR benchmark's: batch 2, levels 64x64, 32x32, 16x16
and 8x8 (S = Lq = 5440), 8 heads of 32 channels, 4 points. Inputs require grad in both timings,
as in training. Each figure is the median over --iters runs after --warmup untimed ones.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detr_ssl.ops import available_backends, ms_deform_attn  # noqa: E402
from detr_ssl.utils.machine import machine_info  # noqa: E402

SHAPES = ((64, 64), (32, 32), (16, 16), (8, 8))


def make_inputs(batch: int, heads: int, channels: int, points: int, dtype: torch.dtype, device: str):
    shapes = torch.tensor(SHAPES, dtype=torch.int64, device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    values = queries = int(sizes.sum())
    value = torch.randn(batch, values, heads, channels, dtype=dtype, device=device)
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, dtype=dtype, device=device)
    weights = torch.rand(batch, queries, heads, len(SHAPES) * points, device=device).softmax(-1)
    weights = weights.view(batch, queries, heads, len(SHAPES), points).to(dtype)
    return value, shapes, starts, locations, weights


def timed(fn, device: str, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(backend: str, device: str, opts: argparse.Namespace) -> dict:
    dtype = getattr(torch, opts.dtype)
    value, shapes, starts, locations, weights = make_inputs(opts.batch_size, opts.heads, opts.channels, opts.points,
                                                            dtype, device)
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)

    def forward():
        return ms_deform_attn(value, shapes, starts, locations, weights, backend=backend)

    def forward_backward():
        forward().sum().backward()

    return {
        "backend": backend,
        "device": device,
        "dtype": opts.dtype,
        "forward_s": round(timed(forward, device, opts.iters, opts.warmup), 4),
        "forward_backward_s": round(timed(forward_backward, device, opts.iters, opts.warmup), 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32, help="channels per head")
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    kernels = available_backends()
    runs = [("pytorch", "cpu")] + [("cpu", "cpu")] * ("cpu" in kernels)
    if torch.cuda.is_available():
        runs += [("pytorch", "cuda")] + [("cuda", "cuda")] * ("cuda" in kernels)
    if opts.dtype in ("float16", "bfloat16"):
        runs = [run for run in runs if run[1] == "cuda"]
    results = [bench(backend, device, opts) for backend, device in runs]
    reference = {r["device"]: r for r in results if r["backend"] == "pytorch"}
    for r in results:
        base = reference[r["device"]]
        r["speedup_forward"] = round(base["forward_s"] / r["forward_s"], 2)
        r["speedup_forward_backward"] = round(base["forward_backward_s"] / r["forward_backward_s"], 2)

    report = {
        "machine": {**machine_info(), "torch": torch.__version__, "python": platform.python_version()},
        "shapes": {"batch": opts.batch_size, "levels": [list(s) for s in SHAPES],
                   "queries": sum(h * w for h, w in SHAPES), "heads": opts.heads, "channels": opts.channels,
                   "points": opts.points},
        "iters": opts.iters,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
