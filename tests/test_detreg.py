"""DETReg: pseudo-box detection with an object-embedding head, through the method interface and the CLI."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import load_script
from detr_ssl.__main__ import main
from detr_ssl.config import parse_args
from detr_ssl.data import build_dataset, collate_fn
from detr_ssl.engine.checkpoint import load_pretrained_encoder
from detr_ssl.methods.detreg import DETReg, box_features
from detr_ssl.models import build_model
from test_ssl_cli import DEFORMABLE, SAMPLE, TINY, seeded_training_setup

UNLABELLED = SAMPLE / "unlabelled"


@pytest.fixture(scope="module")
def proposals(tmp_path_factory) -> Path:
    """Selective-search pseudo-boxes of the sample's unlabelled photos (fast mode on 128 px copies)."""
    out = tmp_path_factory.mktemp("proposals") / "proposals.json"
    propose = load_script("propose_boxes")
    assert propose.main(["--images", str(UNLABELLED), "--out", str(out), "--resize", "128", "--top_k", "10",
                         "--workers", "1"]) == 0
    return out


def detreg_flags(proposals: Path, model_flags: list[str]) -> list[str]:
    return [*model_flags, "--ssl_method", "detreg", "--ssl_mode", "pretrain", "--dataset_file", "folder",
            "--data_path", str(UNLABELLED), "--proposals", str(proposals)]


def test_box_features_average_the_feature_cells_under_the_box():
    """A box covering whole feature cells pools exactly their mean: the stride and the normalised
    coordinates (relative to the valid size, not the padded one) line up."""
    features = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    stride, size = 8, torch.tensor([32, 40])  # valid 32 x 40 px of a 32 x 48 padded map
    x0, y0, x1, y1 = 8.0, 8.0, 24.0, 24.0  # cells (1..2, 1..2)
    box = torch.tensor([[(x0 + x1) / 2 / 40, (y0 + y1) / 2 / 32, (x1 - x0) / 40, (y1 - y0) / 32]])
    pooled = box_features(features, [box], [size], stride)
    assert torch.allclose(pooled, features[0, :, 1:3, 1:3].mean((1, 2))[None], atol=1e-5)


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
def test_losses_vanish_for_a_perfect_prediction(proposals, model_flags):
    """Predicted boxes on the pseudo-boxes, confident object scores and embeddings equal to the pooled
    features: every DETReg loss is (nearly) zero; a wrong embedding is not."""
    args = parse_args([*TINY, *detreg_flags(proposals, model_flags)])
    model, criterion, _ = build_model(args)
    samples, targets = collate_fn([build_dataset("train", args)[i] for i in range(2)])
    model.eval()
    outputs = model(samples)  # pre-training mode: the method's pass in evaluation too
    method = model.ssl_method
    for image, target in enumerate(targets):
        count = len(target["boxes"])
        outputs["pred_boxes"][image, :count] = target["boxes"]
        outputs["pred_boxes"][image, count:] = 0.5
    logits = outputs["pred_logits"]
    logits.fill_(-30.0)
    for image, target in enumerate(targets):
        count = len(target["boxes"])
        logits[image, :count, 0] = 30.0
        if not model_flags:  # softmax: the rest predict no-object
            logits[image, count:, 1] = 30.0
    indices = [(torch.arange(len(t["boxes"])), torch.arange(len(t["boxes"]))) for t in targets]
    perfect = box_features(outputs["detreg_inputs"]["features"], [t["boxes"] for t in targets],
                           [t["size"] for t in targets], method.stride)
    embedding = outputs["pred_embedding"].detach().clone()
    embedding[torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]), torch.cat([q for q, _ in indices])] = perfect
    outputs.pop("aux_outputs", None)
    outputs = {**outputs, "pred_embedding": embedding}
    losses = criterion(outputs, targets)
    for name in ("loss_bbox", "loss_giou", "loss_object_embedding"):
        assert losses[name].item() == pytest.approx(0.0, abs=1e-4), name
    assert losses["loss_ce"].item() < 1e-3
    outputs["pred_embedding"] = embedding + 1.0
    assert criterion(outputs, targets)["loss_object_embedding"].item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
def test_detreg_losses_fall_on_real_pseudo_boxes(proposals, model_flags):
    """A tiny detector learns the selective-search boxes of real photos: box and embedding losses fall."""
    flags = [*detreg_flags(proposals, model_flags), "--proposal_top_k", "3", "--no-augment"]
    args = parse_args([*TINY, *flags])
    samples, targets = collate_fn([build_dataset("train", args)[i] for i in range(2)])
    model, criterion, optimizer = seeded_training_setup(flags)
    assert all(not p.requires_grad for p in model.backbone.parameters())  # frozen by default, as DETReg
    boxes, embeddings = [], []
    for _ in range(40):
        loss_dict = criterion(model(samples), targets)
        assert {"loss_ce", "loss_bbox", "loss_giou", "loss_object_embedding"} <= set(loss_dict)
        loss = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        boxes.append((loss_dict["loss_bbox"] + loss_dict["loss_giou"]).item())
        embeddings.append(loss_dict["loss_object_embedding"].item())
    assert sum(boxes[-5:]) / 5 < 0.8 * sum(boxes[:3]) / 3, boxes
    assert sum(embeddings[-5:]) / 5 < 0.8 * sum(embeddings[:3]) / 3, embeddings


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
def test_pretrain_with_detreg_then_fine_tune_detection(tmp_path, proposals, model_flags):
    """The CLI end to end: DETReg pre-training logs its losses and pictures, and ``--pretrain`` hands
    decoder, queries and box head (not the classifier or the embedding head) to a detector."""
    pre = tmp_path / "pre"
    main([*TINY, *detreg_flags(proposals, model_flags), "--epochs", "2", "--output_dir", str(pre)])
    log = [json.loads(line) for line in (pre / "log.jsonl").read_text().splitlines()]
    assert {"train_loss_ce", "train_loss_bbox", "train_loss_object_embedding"} <= set(log[-1])
    assert "ssl/detreg_boxes" in EventAccumulator(str(pre / "tensorboard")).Reload().Tags()["images"]
    pretrained = torch.load(pre / "checkpoint.pth", weights_only=True)["model"]
    assert "feature_embed.layers.0.weight" in pretrained

    detector, _, _ = build_model(parse_args([*TINY, *model_flags, "--num_classes", "5"]))
    report = load_pretrained_encoder(detector, pre / "checkpoint.pth", logging.getLogger("test"))
    state = detector.state_dict()
    box_head = "bbox_embed.layers.2.weight" if not model_flags else "bbox_embed.0.layers.2.weight"
    for key in ("transformer.decoder.layers.0.linear1.weight", box_head, "backbone.0.body.layer1.0.conv1.weight"):
        assert key in report.loaded and torch.equal(state[key], pretrained[key])
    if not model_flags:
        assert "query_embed.weight" in report.loaded
    assert not any(k.startswith(("class_embed", "feature_embed")) for k in report.loaded)


def parse_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    with pytest.raises(SystemExit):
        parse_args(argv)
    return capsys.readouterr().err.splitlines()[-1]


def test_flags(proposals, capsys):
    args = parse_args(["--ssl_task", "detreg", "--ssl_mode", "pretrain", "--dataset_file", "folder", "--data_path",
                       str(UNLABELLED), "--proposals", str(proposals)])
    assert args.ssl_method == "detreg" and args.ssl_task == "none" and args.lr_backbone == 0.0
    assert parse_args([*detreg_flags(proposals, []), "--lr_backbone", "1e-5"]).lr_backbone == 1e-5
    assert "--proposals FILE" in parse_error(capsys, ["--ssl_method", "detreg", "--ssl_mode", "pretrain",
                                                      "--dataset_file", "folder", "--data_path", str(UNLABELLED)])
    assert "--ssl_mode pretrain" in parse_error(capsys, [*detreg_flags(proposals, []), "--ssl_mode", "multitask"])
    assert "--object_embedding_loss_coef" in parse_error(capsys, [*detreg_flags(proposals, []),
                                                                  "--object_embedding_loss_coef", "-1"])
    assert "one whole-detector method" in parse_error(capsys, [*detreg_flags(proposals, []), "--query_patches"])
    assert DETReg.recognises({"feature_embed.layers.0.weight": torch.zeros(1)})


def test_detreg_runs_next_to_an_encoder_task(proposals):
    """One run, two pretext losses: the encoder task's on the corrupted images, DETReg's on the clean pass."""
    args = parse_args([*TINY, *detreg_flags(proposals, DEFORMABLE), "--ssl_task", "mim_continuous"])
    model, criterion, _ = build_model(args)
    samples, targets = collate_fn([build_dataset("train", args)[i] for i in range(2)])
    losses = criterion(model.train()(samples), targets)
    assert {"loss_ssl", "loss_object_embedding", "loss_bbox"} <= set(losses)
    assert {"loss_ssl", "loss_object_embedding"} <= set(criterion.weight_dict)
