"""Which library computes COCO box metrics (``--coco_eval_backend``).

``pycocotools`` (the default, as the official code) or ``faster_coco_eval``: the
faster-coco-eval package's ``COCOeval_faster``, a drop-in ``COCOeval`` whose per-image matching
and accumulation run in C++. It takes pycocotools ``COCO`` objects as they are and fills the
same ``params`` and ``eval['precision' / 'recall']`` arrays, with the same numbers (checked in
tests/test_coco_backend.py); on dense scenes it is several times faster (docs/benchmarks.md).
Install it with ``pip install -e ".[fast-eval]"`` (or ``pip install faster-coco-eval``).
"""
from __future__ import annotations

from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_ssl.config import COCO_EVAL_BACKENDS as BACKENDS


def coco_evaluator(coco_gt: COCO, results: list[dict[str, Any]], backend: str = "pycocotools") -> COCOeval:
    """A box ``COCOeval`` of ``results`` (COCO result dicts, xywh) against ``coco_gt``, not yet run.

    ``coco_gt.loadRes`` loads the results for both back ends, so boxes, areas and ids are the same.
    """
    if backend == "pycocotools":
        return COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCOeval_faster
        except ImportError as err:
            raise ImportError(
                "--coco_eval_backend faster_coco_eval needs the faster-coco-eval package: "
                "pip install -e '.[fast-eval]' (or pip install faster-coco-eval), or use --coco_eval_backend "
                "pycocotools") from err
        return COCOeval_faster(coco_gt, coco_gt.loadRes(results), "bbox", print_function=lambda *_: None)
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; known: {', '.join(BACKENDS)}")
