"""Check a dataset before training on it: every problem at once, grouped by kind.

    python scripts/check_data.py --data_path /data/coco [--dataset_file coco] [--splits train,val] [--check_data full]

quick (the default, and what a training run does first) opens every image's header and compares
its size with the json, and checks the records (category ids, boxes); full also decodes every
image, which finds truncated files. Prints a summary per split (images, objects, categories,
boxes clipped to the image, empty images) and either "no problems" (exit code 0) or the problems
(exit code 1), each kind with its count and its first files and records by name.
"""
from __future__ import annotations

import argparse
import sys
import time

from detr_ssl.config import DATASETS
from detr_ssl.data.check import CHECK_LEVELS, check_dataset, dataset_for_check, problem_message
from detr_ssl.utils.errors import UserError, one_line

HINT = "fix them, or train with --skip_bad_samples to skip and log them"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="dataset root, as for training")
    parser.add_argument("--dataset_file", default="coco", choices=DATASETS, help="dataset kind, as for training")
    parser.add_argument("--splits", default="train,val",
                        help="comma-separated split names (default: train,val); ignored for --dataset_file folder")
    parser.add_argument("--check_data", default="quick", choices=CHECK_LEVELS,
                        help="quick: image headers, sizes and records; full: also decode every image")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    splits = ["-"] if args.dataset_file == "folder" else [s for s in args.splits.split(",") if s]
    start, reports, unusable = time.perf_counter(), [], []
    for split in splits:
        try:
            reports.append(check_dataset(dataset_for_check(args.data_path, args.dataset_file, split), args.check_data))
        except UserError as err:  # a whole file that cannot be read: nothing in it to check
            unusable.append(f"{split}: {one_line(err)}")
    for report in reports:
        print(report.summary())
        print("".join(f"  note: {line}\n" for line in report.note_lines()), end="")
    images = sum(report.images for report in reports)
    print(f"checked {images} images ({args.check_data}) in {time.perf_counter() - start:.2f} s")
    message = problem_message(reports, args.check_data, HINT)
    for line in [*unusable, *([message] if message else [])]:
        print(line)
    if not message and not unusable:
        print("no problems")
    return 1 if message or unusable else 0


if __name__ == "__main__":
    sys.exit(main())
