"""Engine: gradient accumulation, optimiser groups, COCO evaluation, logging."""
from __future__ import annotations

import argparse
import copy
import io
import json
import logging
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torchvision.ops import box_convert

from detr_ssl.engine.evaluate import evaluate
from detr_ssl.engine.optim import build_lr_scheduler, build_optimizer
from detr_ssl.engine.train import train_one_epoch
from detr_ssl.utils.logging import MetricTracker, TensorBoardLogger, setup_logging
from detr_ssl.utils.misc import NestedTensor

LOGGER = logging.getLogger("test_engine")
NUM_CLASSES = 4  # COCO-style: classifier size = largest category id + 1; one more logit for no-object


def make_batch(images: torch.Tensor, ids: list[int], sizes: list[tuple[int, int]] | None = None):
    """A NestedTensor without padding and official-style targets with one box per image."""
    generator = torch.Generator().manual_seed(sum(ids))
    targets = []
    for i, image_id in enumerate(ids):
        height, width = sizes[i] if sizes else images.shape[-2:]
        targets.append({
            "boxes": torch.rand(1, 4, generator=generator, dtype=images.dtype) * 0.5 + 0.25,
            "labels": torch.randint(0, NUM_CLASSES, (1,), generator=generator),
            "image_id": torch.tensor([image_id]),
            "orig_size": torch.tensor([height, width]),
            "size": torch.tensor(images.shape[-2:]),
        })
    mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    return NestedTensor(images, mask), targets


def concat(batches):
    samples = NestedTensor(torch.cat([s.tensors for s, _ in batches]), torch.cat([s.mask for s, _ in batches]))
    return samples, [t for _, targets in batches for t in targets]


class PerImageDetector(nn.Module):
    """Each image's outputs depend on that image only (no batch statistics), so a mean loss over
    a concatenated batch is exactly the average of the per-batch means."""

    def __init__(self, num_queries: int = 2) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.backbone = nn.Linear(3, 6, dtype=torch.float64)
        self.bbox_embed = nn.Linear(6, num_queries * 4, dtype=torch.float64)
        self.class_embed = nn.Linear(6, num_queries * (NUM_CLASSES + 1), dtype=torch.float64)

    def forward(self, samples: NestedTensor) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.backbone(samples.tensors.mean(dim=(2, 3))))
        batch = features.shape[0]
        return {
            "pred_logits": self.class_embed(features).view(batch, self.num_queries, NUM_CLASSES + 1),
            "pred_boxes": self.bbox_embed(features).sigmoid().view(batch, self.num_queries, 4),
        }


class MeanCriterion(nn.Module):
    """Batch-mean L1 and cross-entropy on the first query, plus an unweighted logging metric."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_dict = {"loss_bbox": 5.0, "loss_ce": 1.0}

    def forward(self, outputs, targets):
        boxes = torch.cat([t["boxes"] for t in targets])
        labels = torch.cat([t["labels"] for t in targets])
        return {
            "loss_bbox": (outputs["pred_boxes"][:, 0] - boxes).abs().sum(-1).mean(),
            "loss_ce": F.cross_entropy(outputs["pred_logits"][:, 0], labels),
            "class_error": torch.tensor(50.0),
        }


class RecordingTensorBoard:
    def __init__(self) -> None:
        self.calls = []

    def scalars(self, values, step, prefix=""):
        self.calls.append((prefix, step, dict(values)))


def train_args(**overrides) -> argparse.Namespace:
    values = dict(model="detr", amp=False, amp_dtype="auto", accum_steps=1, clip_max_norm=0.0, limit_train_batches=None, limit_val_batches=None, max_dets=100,
                  max_bad_steps=5, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, lr_drop=2)
    return argparse.Namespace(**{**values, **overrides})


def batches(count: int, batch_size: int = 2):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count * batch_size, 3, 4, 5, generator=generator, dtype=torch.float64)
    return [make_batch(images[i * batch_size:(i + 1) * batch_size], [10 * i + j for j in range(batch_size)])
            for i in range(count)]


def train(model, loader, accum_steps, epoch=0, tb=None, **overrides):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    args = train_args(accum_steps=accum_steps, clip_max_norm=0.3, **overrides)
    return train_one_epoch(model, MeanCriterion(), loader, optimizer, "cpu", epoch, args,
                           tb or RecordingTensorBoard(), LOGGER)


@pytest.mark.parametrize("num_batches, accum_steps, windows", [
    (2, 2, [[0, 1]]),
    (3, 2, [[0, 1], [2]]),  # the short last window steps too, averaged over its own size
    (4, 3, [[0, 1, 2], [3]]),
])
def test_accumulation_equals_steps_on_concatenated_batches(num_batches, accum_steps, windows):
    data = batches(num_batches)
    initial = PerImageDetector()
    accumulated, reference, unaccumulated = copy.deepcopy(initial), copy.deepcopy(initial), copy.deepcopy(initial)

    train(accumulated, data, accum_steps)
    train(reference, [concat([data[i] for i in window]) for window in windows], accum_steps=1)
    train(unaccumulated, data, accum_steps=1)

    for a, r, u, i in zip(accumulated.parameters(), reference.parameters(), unaccumulated.parameters(),
                          initial.parameters()):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
    assert any(not torch.equal(a, i) for a, i in zip(accumulated.parameters(), initial.parameters()))
    assert any(not torch.allclose(a, u) for a, u in zip(accumulated.parameters(), unaccumulated.parameters()))


def test_gradients_are_clipped_to_max_norm():
    model = PerImageDetector()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_one_epoch(model, MeanCriterion(), batches(1), optimizer, "cpu", 0, train_args(clip_max_norm=1e-3),
                    RecordingTensorBoard(), LOGGER)
    step = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm().item() == pytest.approx(1e-3)  # SGD with lr 1 moves by exactly the clipped gradient


def test_train_logs_per_optimizer_step_and_returns_epoch_means():
    tb = RecordingTensorBoard()
    stats = train(PerImageDetector(), batches(6), accum_steps=2, epoch=1, tb=tb, limit_train_batches=5)

    assert [(prefix, step) for prefix, step, _ in tb.calls] == [("train", 3), ("train", 4), ("train", 5)]
    assert set(tb.calls[0][2]) == {"loss", "loss_bbox", "loss_ce", "class_error", "lr"}
    assert stats["class_error"] == 50.0 and stats["lr"] == 0.5
    assert stats["loss"] == pytest.approx(5 * stats["loss_bbox"] + stats["loss_ce"])


def test_optimizer_groups_follow_official_detr():
    model = PerImageDetector()
    model.backbone.bias.requires_grad_(False)
    args = train_args(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, lr_drop=2)
    optimizer = build_optimizer(model, args)
    rest, backbone = optimizer.param_groups

    assert [id(p) for p in rest["params"]] == [id(p) for n, p in model.named_parameters() if "backbone" not in n]
    assert [id(p) for p in backbone["params"]] == [id(model.backbone.weight)]
    assert (rest["lr"], backbone["lr"]) == (1e-4, 1e-5)
    assert rest["weight_decay"] == backbone["weight_decay"] == 1e-4

    scheduler = build_lr_scheduler(optimizer, args)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-5, 1e-6])


def test_cpu_optimizers_use_the_fused_adamw_kernel_with_the_loops_update(monkeypatch):
    """On the CPU AdamW runs fused (2.5-3.5x faster there); its update is the per-tensor loop's to float
    rounding, including weight decay and the backbone's group."""
    from detr_ssl.engine import optim

    args = train_args(lr=1e-3, lr_backbone=1e-4, weight_decay=1e-2, lr_drop=2)
    fused_model, loop_model = PerImageDetector(), PerImageDetector()
    loop_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, args)
    monkeypatch.setattr(optim, "_fused_on_cpu", False)
    loop = build_optimizer(loop_model, args)
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in loop.param_groups)
    torch.manual_seed(0)
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), loop_model.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# evaluation

IMAGES = [
    {"id": 1, "width": 640, "height": 480, "file_name": "1.jpg"},
    {"id": 2, "width": 500, "height": 375, "file_name": "2.jpg"},
    {"id": 3, "width": 320, "height": 240, "file_name": "3.jpg"},
]
ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [40.0, 60.0, 300.0, 200.0]},
    {"id": 2, "image_id": 1, "category_id": 3, "bbox": [420.0, 300.0, 60.0, 45.0]},
    {"id": 3, "image_id": 2, "category_id": 3, "bbox": [10.0, 20.0, 25.0, 18.0]},
    {"id": 4, "image_id": 3, "category_id": 1, "bbox": [100.0, 50.0, 120.0, 150.0]},
]


def coco_ground_truth(annotations) -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": IMAGES,
        "annotations": [{**a, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0} for a in annotations],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    with redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class OracleDetector(nn.Module):
    """Reads the image id written into pixel (0, 0) and answers with that image's ground truth:
    one confident query per box, the other queries 'no object'."""

    def __init__(self, coco: COCO, num_queries: int = 15) -> None:
        super().__init__()
        self.coco, self.num_queries = coco, num_queries

    def forward(self, samples: NestedTensor):
        logits = torch.zeros(len(samples.tensors), self.num_queries, NUM_CLASSES + 1)
        logits[..., NUM_CLASSES] = 10.0
        boxes = torch.full((len(samples.tensors), self.num_queries, 4), 0.5)
        for b, image_id in enumerate(samples.tensors[:, 0, 0, 0].long().tolist()):
            image = self.coco.imgs[image_id]
            scale = torch.tensor([image["width"], image["height"]] * 2, dtype=torch.float32)
            for q, ann in enumerate(self.coco.imgToAnns[image_id]):
                xywh = torch.tensor(ann["bbox"])
                boxes[b, q] = box_convert(xywh, "xywh", "cxcywh") / scale
                logits[b, q, ann["category_id"]] = 20.0
        return {"pred_logits": logits, "pred_boxes": boxes}


class PostProcess(nn.Module):
    """The official DETR box post-processing (softmax without no-object, absolute xyxy)."""

    def forward(self, outputs, target_sizes):
        scores, labels = outputs["pred_logits"].softmax(-1)[..., :-1].max(-1)
        height, width = target_sizes.unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)[:, None, :]
        boxes = box_convert(outputs["pred_boxes"], "cxcywh", "xyxy") * scale
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


class NothingFound(nn.Module):
    def forward(self, outputs, target_sizes):
        return [{"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
                for _ in target_sizes]


class ZeroCriterion(nn.Module):
    weight_dict = {"loss_bbox": 1.0}

    def forward(self, outputs, targets):
        return {"loss_bbox": outputs["pred_boxes"].mean(), "class_error": torch.tensor(0.0)}


def val_loader():
    """One image per batch; pixel (0, 0) carries the image id for the oracle."""
    loader = []
    for image in IMAGES:
        pixels = torch.zeros(1, 3, 6, 8)
        pixels[0, 0, 0, 0] = image["id"]
        loader.append(make_batch(pixels, [image["id"]], sizes=[(image["height"], image["width"])]))
    return loader


def run_evaluate(coco, postprocess, tmp_path, **overrides):
    tb = RecordingTensorBoard()
    metrics = evaluate(OracleDetector(coco), ZeroCriterion(), {"bbox": postprocess}, val_loader(), coco, "cpu",
                       train_args(max_dets=12, **overrides), str(tmp_path), 7, tb, LOGGER)
    return metrics, tb


@pytest.mark.parametrize("limit_val_batches", [None, 2])
def test_ground_truth_predictions_score_ap_one(tmp_path, caplog, limit_val_batches):
    coco = coco_ground_truth(ANNOTATIONS)
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        metrics, tb = run_evaluate(coco, PostProcess(), tmp_path, limit_val_batches=limit_val_batches)

    # With the limit, image 3 is not evaluated, so its box must not count as missed.
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR12"] == pytest.approx(1.0)  # max_dets != 100: pycocotools' summarize() would give -1
    assert len(metrics["coco_eval_bbox"]) == 12 and metrics["coco_eval_bbox"][0] == metrics["AP"]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets= 12 ]" in caplog.text
    measured = {name: ap for name, ap in metrics["per_class_AP"].items() if ap >= 0}
    assert measured and all(ap == pytest.approx(1.0) for ap in measured.values())
    assert "AP per category" in caplog.text

    results = json.loads((tmp_path / "results_0007.json").read_text())
    evaluated = [1, 2] if limit_val_batches else [1, 2, 3]
    assert sorted({r["image_id"] for r in results}) == evaluated
    assert len(results) == 12 * len(evaluated)  # top max_dets of the 15 queries
    best = max((r for r in results if r["image_id"] == 2), key=lambda r: r["score"])
    assert best["category_id"] == 3 and best["bbox"] == pytest.approx([10.0, 20.0, 25.0, 18.0], abs=1e-3)

    val_scalars = {k for prefix, step, values in tb.calls if prefix == "val" and step == 7 for k in values}
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "loss", "loss_bbox"} <= val_scalars


def test_a_category_without_ground_truth_is_reported_not_scored(tmp_path, caplog):
    coco = coco_ground_truth([a for a in ANNOTATIONS if a["category_id"] == 3])  # no person boxes at all
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        metrics, _ = run_evaluate(coco, PostProcess(), tmp_path, limit_val_batches=None)
    assert metrics["per_class_AP"] == {"person": -1.0, "car": pytest.approx(1.0)}
    assert "no ground truth in the evaluated images, so no AP, for 1 categories: person" in caplog.text


def test_no_detections_give_ap_zero(tmp_path, caplog):
    coco = coco_ground_truth(ANNOTATIONS)
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        metrics, _ = run_evaluate(coco, NothingFound(), tmp_path)
    assert metrics["coco_eval_bbox"] == [0.0] * 12 and metrics["AP"] == 0.0
    assert "no detections" in caplog.text
    assert json.loads((tmp_path / "results_0007.json").read_text()) == []


def test_images_without_ground_truth_do_not_crash(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        metrics, _ = run_evaluate(coco_ground_truth([]), PostProcess(), tmp_path)
    assert metrics["AP"] == -1.0
    assert "no ground-truth boxes" in caplog.text


# ---------------------------------------------------------------------------------------------
# logging


def test_tensorboard_writes_tagged_scalars_and_is_a_no_op_without_output_dir(tmp_path):
    tb = TensorBoardLogger(str(tmp_path))
    tb.scalars({"loss": torch.tensor(1.5), "lr": 1e-4}, step=3, prefix="train")
    tb.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 1.5)]

    for disabled in (TensorBoardLogger(""), TensorBoardLogger(str(tmp_path / "off"), enabled=False)):
        assert disabled.writer is None
        disabled.scalars({"loss": 1.0}, step=0)
    assert not (tmp_path / "off").exists()


def test_setup_logging_writes_log_file_on_rank_zero_only(tmp_path):
    logger = setup_logging(str(tmp_path), rank=0)
    logger.info("hello from rank 0")
    assert logger.level == logging.INFO
    setup_logging(str(tmp_path / "rank1"), rank=1)
    assert logger.level == logging.WARNING and not (tmp_path / "rank1" / "log.txt").exists()
    logger = setup_logging(None, rank=0)  # closes the file handler
    assert "hello from rank 0" in (tmp_path / "log.txt").read_text()


def test_metric_tracker_means_and_format():
    tracker = MetricTracker()
    tracker.update({"loss": torch.tensor(1.0), "loss_ce": 0.5})
    tracker.update({"loss": 3.0, "loss_ce": 1.5})
    assert tracker.summary() == {"loss": 2.0, "loss_ce": 1.0}
    assert tracker.format() == "loss 2.0000  loss_ce 1.0000"
