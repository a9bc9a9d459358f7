"""Time COCO box evaluation on a dense synthetic set and print JSON.

    python scripts/benchmark_eval.py                       # 50 images x 500 boxes, 1000 detections each
    python scripts/benchmark_eval.py --images 20 --repeats 1

The set looks like aerial patches: 1024x1024 images, 15 categories, box sides log-uniform in
6..150 px (most boxes "small" by COCO's ranges). Detections: each ground-truth box is found
with probability 0.8 (box jittered by up to 15 % of its side, the right category 90 % of the
time, higher scores), the rest of the --dets per image are false positives at random places;
seeded. COCOeval runs with maxDets (1, 10, --dets), from loading the results to ``accumulate()``.

Every available back end of ``detr_ssl.engine.coco_backend`` runs in turn, --repeats times
interleaved (A, B, A, B, ...), and the script prints the largest differences of their precision
and recall arrays. Absolute figures move with the machine's load; compare within one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detr_ssl.engine.coco_backend import BACKENDS, coco_evaluator  # noqa: E402
from detr_ssl.utils.machine import machine_info  # noqa: E402

SIZE, NUM_CATEGORIES = 1024, 15


def random_xywh(rng: np.random.Generator, n: int) -> np.ndarray:
    side = np.exp(rng.uniform(np.log(6), np.log(150), (n, 2)))
    corner = rng.uniform(0, 1, (n, 2)) * (SIZE - side)
    return np.concatenate([corner, side], axis=1)


def dense_set(images: int, boxes: int, dets: int, seed: int) -> tuple[COCO, list[dict]]:
    """A ground-truth COCO object and result dicts as described in the module docstring."""
    rng = np.random.default_rng(seed)
    dataset = {"images": [], "annotations": [],
               "categories": [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CATEGORIES + 1)]}
    results = []
    for image_id in range(1, images + 1):
        dataset["images"].append({"id": image_id, "width": SIZE, "height": SIZE, "file_name": f"{image_id}.png"})
        gt = random_xywh(rng, boxes)
        labels = rng.integers(1, NUM_CATEGORIES + 1, boxes)
        for box, label in zip(gt, labels):
            dataset["annotations"].append({"id": len(dataset["annotations"]) + 1, "image_id": image_id,
                                           "category_id": int(label), "bbox": box.tolist(),
                                           "area": float(box[2] * box[3]), "iscrowd": 0})
        found = rng.random(boxes) < 0.8
        hits = gt[found] + rng.uniform(-0.15, 0.15, (found.sum(), 4)) * np.repeat(gt[found, 2:], 2, axis=1)
        hits[:, 2:] = np.maximum(hits[:, 2:], 1.0)
        hit_labels = np.where(rng.random(found.sum()) < 0.9, labels[found],
                              rng.integers(1, NUM_CATEGORIES + 1, found.sum()))
        misses = random_xywh(rng, max(dets - len(hits), 0))
        boxes_out = np.concatenate([hits, misses])[:dets]
        labels_out = np.concatenate([hit_labels, rng.integers(1, NUM_CATEGORIES + 1, len(misses))])[:dets]
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(hits)), rng.uniform(0.0, 0.6, len(misses))])[:dets]
        results += [{"image_id": image_id, "category_id": int(label), "bbox": box.tolist(), "score": float(score)}
                    for box, label, score in zip(boxes_out, labels_out, scores)]
    coco_gt = COCO()
    coco_gt.dataset = dataset
    with redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    return coco_gt, results


def run(coco_gt: COCO, results: list[dict], backend: str, dets: int):
    with redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        coco_eval = coco_evaluator(coco_gt, results, backend)
        coco_eval.params.maxDets = [1, 10, dets]
        coco_eval.evaluate()
        coco_eval.accumulate()
        seconds = time.perf_counter() - start
    return seconds, coco_eval


def ap(coco_eval) -> float:
    precision = coco_eval.eval["precision"][..., 0, -1]  # all areas, largest maxDets
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--boxes", type=int, default=500, help="ground-truth boxes per image")
    parser.add_argument("--dets", type=int, default=1000, help="detections per image (and the largest maxDets)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each back end, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    backends = [b for b in BACKENDS if b == "pycocotools" or importlib.util.find_spec(b) is not None]
    coco_gt, results = dense_set(opts.images, opts.boxes, opts.dets, opts.seed)
    times = {backend: [] for backend in backends}
    evals = {}
    for _ in range(opts.repeats):
        for backend in backends:
            seconds, evals[backend] = run(coco_gt, results, backend, opts.dets)
            times[backend].append(seconds)
    reference = evals["pycocotools"]
    report = {}
    for backend in backends:
        other = evals[backend].eval
        report[backend] = {
            "s": round(statistics.median(times[backend]), 3), "s_min": round(min(times[backend]), 3),
            "AP": round(ap(evals[backend]), 6),
            "max_abs_diff_precision": float(np.abs(other["precision"] - reference.eval["precision"]).max()),
            "max_abs_diff_recall": float(np.abs(other["recall"] - reference.eval["recall"]).max()),
            "speedup_vs_pycocotools": round(statistics.median(times["pycocotools"]) / statistics.median(times[backend]), 2),
        }
    print(json.dumps({
        "benchmark": "coco_eval_bbox", "images": opts.images, "gt_per_image": opts.boxes, "dets_per_image": opts.dets,
        "max_dets": [1, 10, opts.dets], "repeats": opts.repeats, "backends": report,
        "machine": machine_info(gpu=False),
    }, indent=1))


if __name__ == "__main__":
    main()
