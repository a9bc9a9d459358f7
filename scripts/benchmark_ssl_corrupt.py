"""Time the SSL input corruptions, batched against the per-image loops they replaced; print JSON.

    python scripts/benchmark_ssl_corrupt.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/benchmark_ssl_corrupt.py

Jigsaw on 512x512 batches of 2 and 8 images at DETR's stride 32 (16x16 tokens) and Deformable
DETR's stride 8 (64x64 tokens), ratio 0.5: ``permutation_sources`` (which tokens move, where
from: the part that was a loop) against ``per_image``, the previous version, kept only here (the
same token selection, then one rejection-sampled derangement per image, ``randperm`` until no
fixed point, a host sync per draw); and the whole ``permute_patches`` (with the pixel moves,
unchanged) for scale.

UP-DETR: the colour augmentation of 10 crops (128x128) per image, batches of 2 and 8.
``per_crop`` is the previous version: ``QUERY_AUGMENT`` (the torchvision v2 pipeline) called crop
by crop; ``batched`` is ``augment_patches``.

Both versions run alternately in one process (A, B, A, B, ...); medians and minima in ms.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detr_ssl.ssl.jigsaw import jigsaw_counts, permutation_sources, permute_patches  # noqa: E402
from detr_ssl.ssl.patches import select_tokens, token_masks  # noqa: E402
from detr_ssl.ssl.updetr import PATCH_SIZE, QUERY_AUGMENT, augment_patches  # noqa: E402
from detr_ssl.utils.image import denormalize, normalize  # noqa: E402
from detr_ssl.utils.machine import machine_info  # noqa: E402

SIDE = 512
RATIO = 0.5
NUM_PATCHES = 10


def per_image_sources(token_full: torch.Tensor, ratio: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous version of ``permutation_sources``: a Python loop over the images, each drawing
    ``randperm`` until it has no fixed point."""
    moved = select_tokens(token_full, jigsaw_counts(token_full, ratio), generator)
    batch, height, width = moved.shape
    source = torch.arange(height * width).repeat(batch, 1)
    for image_source, image_moved in zip(source, moved.flatten(1)):
        positions = image_moved.nonzero().squeeze(1)
        while True:
            permutation = torch.randperm(len(positions), generator=generator)
            if not (permutation == torch.arange(len(positions))).any():
                break
        image_source[positions] = positions[permutation]
    return moved, source.view_as(moved)


def per_crop_augment(patches: torch.Tensor) -> torch.Tensor:
    """The previous ``augment_patches``: the torchvision v2 pipeline called crop by crop."""
    return normalize(torch.stack([QUERY_AUGMENT(patch) for patch in denormalize(patches)])).to(patches.dtype)


def alternate(runs: dict[str, Callable[[], object]], iters: int, warmup: int) -> dict[str, float]:
    """Median and minimum ms of each run, the runs alternating; with two, how many times faster the second is."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    result = {}
    for name, t in times.items():
        result[f"{name}_ms"] = round(statistics.median(t) * 1e3, 3)
        result[f"{name}_ms_min"] = round(min(t) * 1e3, 3)
    if len(runs) == 2:
        first, second = runs
        result["speedup"] = round(result[f"{first}_ms"] / result[f"{second}_ms"], 2)
    return result


def bench_jigsaw(batch: int, stride: int, opts: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(opts.seed)
    images = torch.randn(batch, 3, SIDE, SIDE, generator=generator)
    valid = torch.ones(batch, SIDE, SIDE, dtype=torch.bool)
    _, token_full = token_masks(valid, stride)
    runs = {"per_image": lambda: per_image_sources(token_full, RATIO, generator),
            "batched": lambda: permutation_sources(token_full, RATIO, generator)}
    whole = alternate({"permute_patches": lambda: permute_patches(images, valid, stride, RATIO, generator)},
                      opts.iters, opts.warmup)
    return {"task": "jigsaw_sources", "batch": batch, "stride": stride, "tokens": (SIDE // stride) ** 2,
            **alternate(runs, opts.iters, opts.warmup), **whole}


def bench_augment(batch: int, opts: argparse.Namespace) -> dict:
    torch.manual_seed(opts.seed)
    patches = torch.randn(batch * NUM_PATCHES, 3, PATCH_SIZE, PATCH_SIZE)
    runs = {"per_crop": lambda: per_crop_augment(patches), "batched": lambda: augment_patches(patches)}
    return {"task": "updetr_crop_augment", "batch": batch, "crops": len(patches),
            **alternate(runs, opts.iters, opts.warmup)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--iters", type=int, default=20, help="timed runs of each version")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    results = [bench_jigsaw(batch, stride, opts) for stride in (32, 8) for batch in opts.batch_sizes]
    results += [bench_augment(batch, opts) for batch in opts.batch_sizes]
    print(json.dumps({
        "benchmark": "ssl_corrupt", "results": results, "iters": opts.iters,
        "machine": machine_info(gpu=False),
        "torch": torch.__version__,
    }, indent=1))


if __name__ == "__main__":
    main()
