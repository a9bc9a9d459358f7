"""Each DETR loss against a value computed by hand."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from detr_ssl.models.criterion import SetCriterion, detection_weight_dict
from detr_ssl.models.matcher import HungarianMatcher


def criterion(num_classes: int = 2, eos_coef: float = 0.1) -> SetCriterion:
    args = SimpleNamespace(model="detr", ssl_task="none", bbox_loss_coef=5.0, giou_loss_coef=2.0, aux_loss=True, dec_layers=3)
    return SetCriterion(num_classes, HungarianMatcher(1, 5, 2), detection_weight_dict(args), eos_coef)


def one_image_case():
    outputs = {"pred_logits": torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]]]),
               "pred_boxes": torch.tensor([[[0.55, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    return outputs, targets


def test_losses_equal_hand_computed_values():
    outputs, targets = one_image_case()
    losses = criterion()(outputs, targets)
    # query 0 matches the target (class 1); query 1 is no-object (class 2, weight 0.1)
    ce_matched = -2.0 + math.log(2 + math.e**2)
    ce_empty = math.log(math.e + 2)
    assert losses["loss_ce"].item() == pytest.approx((1.0 * ce_matched + 0.1 * ce_empty) / 1.1, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.05, rel=1e-5)
    # pred [0.45,0.4,0.65,0.6] vs target [0.4,0.4,0.6,0.6]: IoU 0.03/0.05, enclosing box = union
    assert losses["loss_giou"].item() == pytest.approx(1 - 0.6, rel=1e-5)
    assert losses["class_error"].item() == 0.0
    assert losses["cardinality_error"].item() == 1.0  # two non-empty predictions, one target


def test_aux_outputs_get_suffixed_losses_and_weights():
    outputs, targets = one_image_case()
    outputs["aux_outputs"] = [{k: v.clone() for k, v in outputs.items()} for _ in range(2)]
    crit = criterion()
    losses = crit(outputs, targets)
    for i in range(2):
        for key in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert losses[f"{key}_{i}"].item() == pytest.approx(losses[key].item())
        assert f"class_error_{i}" not in losses
    assert crit.weight_dict == {
        "loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0,
        "loss_ce_0": 1.0, "loss_bbox_0": 5.0, "loss_giou_0": 2.0,
        "loss_ce_1": 1.0, "loss_bbox_1": 5.0, "loss_giou_1": 2.0,
    }


def test_box_losses_are_normalised_by_the_number_of_targets():
    outputs = {"pred_logits": torch.zeros(1, 3, 3),
               "pred_boxes": torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]])}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.72, 0.7, 0.2, 0.2]])}]
    losses = criterion()(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.02 / 2, rel=1e-4)


def test_a_batch_without_targets_trains_no_object_only():
    outputs = {"pred_logits": torch.randn(2, 4, 3, requires_grad=True),
               "pred_boxes": torch.rand(2, 4, 4, requires_grad=True)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = criterion()(outputs, [empty, empty])
    expected_ce = -outputs["pred_logits"].log_softmax(-1)[..., -1].mean()
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    total = sum(losses[k] * w for k, w in criterion().weight_dict.items() if k in losses)
    total.backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_perfect_prediction_has_zero_box_losses():
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.1], [0.6, 0.5, 0.3, 0.3]]])
    logits = torch.tensor([[[9.0, -9.0, -9.0], [-9.0, 9.0, -9.0]]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": boxes[0].clone()}]
    losses = criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["class_error"].item() == 0.0
