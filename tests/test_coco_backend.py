"""--coco_eval_backend: faster-coco-eval gives pycocotools' numbers; a missing package is named."""
from __future__ import annotations

import io
import logging
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from detr_ssl.config import parse_area_ranges
from detr_ssl.engine.coco_backend import coco_evaluator
from detr_ssl.engine.evaluate import coco_bbox_stats

REPO = Path(__file__).resolve().parents[1]
REAL_SETS = {
    "sample_val": REPO / "data" / "sample" / "annotations" / "instances_val.json",
    "isaid_patch": REPO / "tests" / "fixtures" / "isaid_sample" / "train" / "instancesonly_filtered_train.json",
}
LOGGER = logging.getLogger("test_coco_backend")


def load(path: Path) -> COCO:
    with redirect_stdout(io.StringIO()):
        return COCO(str(path))


def detections(coco: COCO, seed: int = 0) -> dict[int, list[dict]]:
    """Imperfect detections of the real boxes: jittered, some missed, some mislabelled, plus false positives."""
    rng = np.random.default_rng(seed)
    category_ids = sorted(coco.cats)
    found = {}
    for image_id, image in coco.imgs.items():
        results = []
        for ann in coco.imgToAnns[image_id]:
            if rng.random() < 0.2:
                continue
            x, y, w, h = ann["bbox"]
            jitter = rng.uniform(-0.2, 0.2, 4) * [w, h, w, h]
            label = ann["category_id"] if rng.random() < 0.85 else int(rng.choice(category_ids))
            results.append({"image_id": image_id, "category_id": label, "score": float(rng.uniform(0.2, 1.0)),
                            "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]})
        for _ in range(20):
            w, h = rng.uniform(4, 120, 2)
            results.append({"image_id": image_id, "category_id": int(rng.choice(category_ids)),
                            "score": float(rng.uniform(0.0, 0.5)),
                            "bbox": [float(rng.uniform(0, image["width"] - w)), float(rng.uniform(0, image["height"] - h)),
                                     float(w), float(h)]})
        found[image_id] = results
    return found


@pytest.mark.parametrize("name", sorted(REAL_SETS))
@pytest.mark.parametrize("max_dets, areas", [(100, "small=0:1024,medium=1024:9216,large=9216:inf"),
                                             (7, "tiny=0:256,small=256:1024,big=1024:inf")])
def test_faster_coco_eval_gives_the_pycocotools_metrics(name, max_dets, areas):
    pytest.importorskip("faster_coco_eval")
    found = detections(load(REAL_SETS[name]))
    area_ranges = parse_area_ranges(areas)
    stats, per_class = coco_bbox_stats(load(REAL_SETS[name]), found, max_dets, LOGGER, area_ranges, "pycocotools")
    fast_stats, fast_per_class = coco_bbox_stats(load(REAL_SETS[name]), found, max_dets, LOGGER, area_ranges,
                                                 "faster_coco_eval")
    assert any(0 < s < 1 for s in stats)  # a real test: neither all-perfect nor all-empty
    assert fast_stats == pytest.approx(stats, abs=1e-12)
    assert fast_per_class == pytest.approx(per_class, abs=1e-12)


def test_a_missing_faster_coco_eval_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import fails as if not installed
    coco = load(REAL_SETS["sample_val"])
    with pytest.raises(ImportError, match="pip install"):
        coco_evaluator(coco, detections(coco)[next(iter(coco.imgs))], "faster_coco_eval")


def test_an_unknown_backend_is_refused():
    coco = load(REAL_SETS["sample_val"])
    with pytest.raises(ValueError, match="pycocotools"):
        coco_evaluator(coco, detections(coco)[next(iter(coco.imgs))], "detectron")


def test_choosing_faster_coco_eval_without_the_package_stops_at_parsing(monkeypatch, capsys):
    """Before any training: the metrics are only computed after the first epoch."""
    import importlib.util

    from detr_ssl.config import parse_args

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "faster_coco_eval" else real_find_spec(name, *a))
    with pytest.raises(SystemExit):
        parse_args(["--coco_eval_backend", "faster_coco_eval"])
    assert "faster-coco-eval package is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_our_summary_rows_equal_cocoeval_summarize_at_default_settings(name):
    """With maxDets 100 and COCO's area ranges our 12 rows are pycocotools' own summarize()."""
    from pycocotools.cocoeval import COCOeval

    coco = load(REAL_SETS[name])
    found = detections(coco, seed=1)
    stats, _ = coco_bbox_stats(coco, found, 100, LOGGER)
    with redirect_stdout(io.StringIO()):
        reference = COCOeval(coco, coco.loadRes([r for results in found.values() for r in results]), "bbox")
        reference.params.imgIds = sorted(found)
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert len(stats) == 12 and any(0 < s < 1 for s in stats)
    assert stats == pytest.approx(list(reference.stats), abs=1e-12)
