"""The Hungarian matcher finds the minimum-cost assignment (checked by brute force)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import generalized_box_iou

from detr_ssl.models.matcher import HungarianMatcher
from detr_ssl.utils.box_ops import cxcywh_to_xyxy


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


def brute_force_cost(logits, boxes, labels, tgt_boxes, weights) -> float:
    """Minimum total cost over every injective map targets -> queries."""
    prob = logits.softmax(-1)
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes))
    cost = weights[0] * -prob[:, labels] + weights[1] * torch.cdist(boxes, tgt_boxes, p=1) - weights[2] * giou
    best = float("inf")
    for queries in itertools.permutations(range(len(boxes)), len(labels)):
        best = min(best, sum(cost[q, t].item() for t, q in enumerate(queries)))
    return best if len(labels) else 0.0


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    weights = (1.0, 5.0, 2.0)
    matcher = HungarianMatcher(*weights)
    num_queries, num_classes = 6, 4
    counts = [int(torch.randint(0, 5, (1,), generator=generator)) for _ in range(3)]
    outputs = {"pred_logits": torch.randn(3, num_queries, num_classes + 1, generator=generator),
               "pred_boxes": random_boxes(3 * num_queries, generator).view(3, num_queries, 4)}
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=generator), "boxes": random_boxes(n, generator)}
               for n in counts]
    indices = matcher(outputs, targets)
    for b, (target, (rows, cols)) in enumerate(zip(targets, indices)):
        assert len(rows) == len(cols) == len(target["labels"])
        assert len(set(rows.tolist())) == len(rows)
        logits, boxes = outputs["pred_logits"][b], outputs["pred_boxes"][b]
        prob = logits.softmax(-1)
        giou = generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target["boxes"]))
        cost = (weights[0] * -prob[:, target["labels"]] + weights[1] * torch.cdist(boxes, target["boxes"], p=1)
                - weights[2] * giou)
        found = cost[rows, cols].sum().item() if len(rows) else 0.0
        optimum = brute_force_cost(logits, boxes, target["labels"], target["boxes"], weights)
        assert found == pytest.approx(optimum, abs=1e-5)


def test_matcher_prefers_the_obvious_pairs():
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1], [0.5, 0.5, 0.3, 0.3]])
    logits = torch.full((1, 3, 3), -5.0)
    logits[0, 0, 1] = logits[0, 1, 0] = 5.0
    targets = [{"labels": torch.tensor([0, 1]), "boxes": boxes[[1, 0]].clone()}]
    rows, cols = HungarianMatcher(1, 5, 2)({"pred_logits": logits, "pred_boxes": boxes[None]}, targets)[0]
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 1, 1: 0}


def test_matcher_handles_images_without_targets():
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    (rows0, cols0), (rows1, cols1) = HungarianMatcher(1, 5, 2)(outputs, targets)
    assert rows0.numel() == cols0.numel() == 0
    assert rows1.numel() == cols1.numel() == 1


def test_all_zero_costs_are_refused():
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)


@pytest.mark.parametrize("focal", [False, True])
def test_batched_matching_equals_matching_each_image_alone(focal):
    """Target lists of different lengths are padded inside the matcher; the padding never leaks into a match."""
    generator = torch.Generator().manual_seed(7)
    counts = [0, 3, 12, 1, 7]
    outputs = {"pred_logits": torch.randn(len(counts), 30, 6, generator=generator) * 2,
               "pred_boxes": random_boxes(len(counts) * 30, generator).view(len(counts), 30, 4)}
    targets = [{"labels": torch.randint(0, 5, (n,), generator=generator), "boxes": random_boxes(n, generator)}
               for n in counts]
    matcher = HungarianMatcher(1, 5, 2, focal=focal)
    together = matcher(outputs, targets)
    for b, target in enumerate(targets):
        alone = matcher({key: value[b:b + 1] for key, value in outputs.items()}, [target])[0]
        assert all(torch.equal(x, y) for x, y in zip(together[b], alone))
        assert together[b][0].dtype == together[b][1].dtype == torch.int64
