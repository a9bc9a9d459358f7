"""scripts/compare_official.py: its comparison finds nothing between equal models and flags a
perturbed copy; with an official checkout (DETR_SSL_OFFICIAL_DETR=PATH, ..._DEFORMABLE_DETR,
..._UPDETR) it also runs the real comparison."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "compare_official.py"

compare_official = load_script("compare_official")

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--enc_layers", "1", "--dec_layers", "2",
        "--hidden_dim", "64", "--nheads", "2", "--dim_feedforward", "64", "--num_queries", "12", "--dropout", "0.0",
        "--device", "cpu"]
ARCHITECTURES = {
    "detr": ["--model", "detr"],
    "deformable_two_stage": ["--model", "deformable_detr", "--with_box_refine", "--two_stage", "--msda_backend",
                             "pytorch", "--num_feature_levels", "3", "--enc_n_points", "2", "--dec_n_points", "2"],
}


@pytest.fixture(scope="module")
def batch(sample_root):
    """Two real photos of different sizes (so the batch is padded) with their boxes, small."""
    return compare_official.load_batch(sample_root, "train", 2, max_size=96)


def twin_sides(architecture: str, images) -> tuple:
    """A reference and a copy of it, as the script prepares the official model and ours."""
    torch.manual_seed(0)
    argv = ARCHITECTURES[architecture] + TINY
    reference, ours = compare_official.build_ours(argv), compare_official.build_ours(argv)
    reference.model.double()
    compare_official.prepare_weights(reference.model, compare_official.pad_batch(images), seed=0)
    compare_official.copy_weights(reference, ours)
    return reference, ours


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_equal_models_pass_and_every_group_is_checked(batch, architecture):
    images, targets = batch
    reference, ours = twin_sides(architecture, images)
    report = compare_official.compare(reference, ours, images, targets, seed=0)
    summary = report.summary()
    assert summary["flagged"] == 0, summary["flagged_items"]
    groups = summary["groups"]
    assert {"outputs (eval)", "outputs (train)", "matching", "losses", "gradients",
            "detections (post-processed, eval)"} <= set(groups)
    names = {c.name for c in report.checks}
    assert {"pred_logits", "pred_boxes", "aux_outputs.0.pred_logits", "loss_ce", "loss_giou_0",
            "weighted total"} <= names
    if architecture == "deformable_two_stage":
        assert {"enc_outputs.pred_boxes", "loss_bbox_enc"} <= names
    gradients = [c for c in report.checks if c.group == "gradients"]
    assert len(gradients) == sum(p.requires_grad for p in ours.model.parameters())
    assert all(c.scale > 0 for c in gradients), "some parameters got no gradient: the check would be empty"


def test_a_perturbed_copy_is_flagged(batch):
    images, targets = batch
    reference, ours = twin_sides("detr", images)
    with torch.no_grad():
        reference.model.transformer.encoder.layers[0].linear2.bias[0] += 1e-6  # one number, far upstream
    report = compare_official.compare(reference, ours, images, targets, seed=0)
    flagged = {(c.group, c.name) for c in report.checks if c.flagged}
    assert ("outputs (eval)", "pred_logits") in flagged
    assert ("losses", "weighted total") in flagged
    assert ("gradients", "transformer.decoder.layers.1.linear2.weight") in flagged
    assert report.summary()["flagged"] == len(flagged)


def test_report_flags_missing_keys_shapes_and_nan():
    report = compare_official.Report(tolerance=1e-10)
    report.tensors("outputs", {"a": torch.zeros(2), "b": torch.zeros(2)}, {"a": torch.zeros(3), "c": torch.zeros(2)})
    report.tensor("losses", "nan", torch.tensor(float("nan")), torch.tensor(1.0))
    report.tensor("losses", "relative", torch.tensor(1e6 + 1e-5), torch.tensor(1e6))  # 1e-11 relative: passes
    report.indices([[(torch.tensor([0, 1]), torch.tensor([1, 0]))]], [[(torch.tensor([0, 1]), torch.tensor([0, 1]))]])
    flagged = {c.name: c.flagged for c in report.checks}
    assert flagged == {"a": True, "b": True, "c": True, "nan": True, "relative": False, "call 0 image 0": True}


def test_query_patch_losses_get_the_official_names():
    side = compare_official.Side("ours", torch.nn.Identity(), torch.nn.Identity(), None, query_patches=True)
    losses = {"loss_patch_ce": 1, "loss_patch_feature_3": 2, "patch_class_error": 3, "patch_cardinality_error": 4}
    assert compare_official.official_losses(side, losses) == {"loss_ce": 1, "loss_feature_3": 2, "class_error": 3,
                                                             "cardinality_error": 4}


def test_reads_the_yolo_layout_with_coco_ids(coco8_dir, sample_root):
    yolo_images, yolo_targets = compare_official.load_batch(coco8_dir, "train", 4, max_size=None)
    coco_images, coco_targets = compare_official.load_batch(sample_root, "train", 4, max_size=None)
    assert [i.shape for i in yolo_images] == [i.shape for i in coco_images]
    for yolo, coco in zip(yolo_targets, coco_targets):
        assert yolo["boxes"].shape == coco["boxes"].shape
        torch.testing.assert_close(yolo["boxes"], coco["boxes"], atol=2e-3, rtol=0)  # the json rounds to pixels
    labels = torch.cat([t["labels"] for t in yolo_targets])
    assert labels.min() >= 1 and labels.max() <= 90  # COCO category ids, not YOLO indices


OFFICIAL_REPOS = {"detr": "DETR_SSL_OFFICIAL_DETR", "deformable_detr": "DETR_SSL_OFFICIAL_DEFORMABLE_DETR",
                  "updetr": "DETR_SSL_OFFICIAL_UPDETR"}


@pytest.mark.parametrize("model", sorted(OFFICIAL_REPOS))
def test_against_the_official_checkout(model, tmp_path):
    repo = os.environ.get(OFFICIAL_REPOS[model])
    if not repo:
        pytest.skip(f"set {OFFICIAL_REPOS[model]}=PATH to an official checkout to compare with it")
    report_file = tmp_path / "report.json"
    # smaller than the official defaults, to be quick; the official Deformable DETR backbone assumes
    # ResNet-50 channel counts, so it keeps ResNet-50
    smaller = ["--enc_layers", "2", "--dec_layers", "2"]
    if model != "deformable_detr":
        smaller += ["--backbone", "resnet18"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--official_repo", repo, "--model", model, "--max_size", "160",
         "--json_out", str(report_file), "--", *smaller],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert report["flagged"] == 0 and report["checks"] > 50
