"""Fit a k-means visual tokenizer for ``--ssl_task mim_discrete`` on a folder of images.

    python scripts/fit_tokenizer.py --data_path data/sample/unlabelled --codebook_size 64 --out tokenizer.pt
    python main.py --ssl_task mim_discrete --tokenizer tokenizer.pt ...

Images (any tree under --data_path; no annotations) are resized like evaluation images
(shorter side --image_size, longer side at most 1333/800 of it, DETR's ratio), normalised
with the ImageNet mean/std and cut into all full p x p patches; a seeded random subset of at
most --max_patches patches is clustered. --patch_size must be the stride of the level the
encoder reads (32 for DETR, 8 for Deformable DETR). Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detr_ssl.ssl.tokenizer import fit_kmeans_tokenizer_on_folder  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", type=Path, required=True, help="folder searched recursively for images")
    parser.add_argument("--codebook_size", type=int, required=True, help="number of visual tokens K")
    parser.add_argument("--out", type=Path, required=True, help="tokenizer file to write")
    parser.add_argument("--patch_size", type=int, default=32, help="patch side in pixels (the encoder level's stride)")
    parser.add_argument("--max_patches", type=int, default=100_000, help="cluster a random subset of this many patches")
    parser.add_argument("--iters", type=int, default=20, help="Lloyd iterations after k-means++")
    parser.add_argument("--image_size", type=int, default=512, help="shorter image side after resizing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = fit_kmeans_tokenizer_on_folder(args.data_path, args.out, args.codebook_size, args.patch_size,
                                                 args.iters, args.image_size, args.max_patches, args.seed,
                                                 args.device, progress=True)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"fit_tokenizer.py: {error}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
