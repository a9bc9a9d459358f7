"""--no-ssl_backbone_grad: the pretext task's loss trains encoder and head but not the backbone,
which still learns from detection."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detr_ssl.__main__ import main
from detr_ssl.config import parse_args
from detr_ssl.models import build_model

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"

TINY = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none",
        "--hidden_dim", "64", "--nheads", "4", "--enc_layers", "2", "--dec_layers", "2", "--dim_feedforward", "128",
        "--num_queries", "10", "--num_classes", "91", "--dropout", "0", "--lr_backbone", "1e-5"]
DEFORMABLE = ["--model", "deformable_detr", "--num_feature_levels", "3", "--msda_backend", "pytorch"]


def build(flags: list[str]):
    torch.manual_seed(0)
    model, criterion, _ = build_model(parse_args([*TINY, *flags]))
    return model.train(), criterion


def loss_and_grads(model, criterion, outputs: dict, targets: list[dict]) -> tuple[dict, dict]:
    losses = criterion(outputs, targets)
    model.zero_grad(set_to_none=True)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
@pytest.mark.parametrize("mode", ["multitask", "pretrain"])
def test_no_ssl_backbone_grad_keeps_the_task_loss_out_of_the_backbone(coco_batch, model_flags, mode):
    samples, targets = coco_batch
    grads = {}
    for backbone_grad in ("--ssl_backbone_grad", "--no-ssl_backbone_grad"):
        model, criterion = build([*model_flags, "--ssl_task", "jigsaw_continuous", "--ssl_mode", mode,
                                  backbone_grad])
        torch.manual_seed(1)
        outputs = model(samples)
        model.zero_grad(set_to_none=True)
        criterion(outputs, targets)["loss_ssl"].backward()
        grads[backbone_grad] = {n: p.grad for n, p in model.named_parameters()}
    trained_backbone = 0
    for name, grad in grads["--ssl_backbone_grad"].items():
        without = grads["--no-ssl_backbone_grad"][name]
        if name.startswith("backbone.") and grad is not None:
            assert grad.abs().sum() > 0 and without is None, name
            trained_backbone += 1
        elif name.startswith(("transformer.encoder.", "ssl_head.")):
            torch.testing.assert_close(without, grad, rtol=1e-4, atol=1e-6, msg=name)  # same loss, same encoder grads
    assert trained_backbone > 10


def test_no_ssl_backbone_grad_still_trains_the_backbone_for_detection(coco_batch):
    samples, targets = coco_batch
    model, criterion = build(["--ssl_task", "mim_continuous", "--no-ssl_backbone_grad"])
    losses, grads = loss_and_grads(model, criterion, model(samples), targets)
    assert losses["loss_ssl"] > 0
    assert grads["backbone.0.body.layer4.0.conv1.weight"].abs().sum() > 0


@pytest.mark.parametrize("flags, message", [
    (["--no-ssl_backbone_grad"], "needs an --ssl_task"),
    (["--no-ssl_backbone_grad", "--ssl_task", "updetr"], "needs an --ssl_task"),
    (["--no-ssl_backbone_grad", "--ssl_task", "reconstruction"], "same clean pass"),
    (["--no-ssl_backbone_grad", "--ssl_task", "reconstruction", "--ssl_mode", "pretrain", "--query_patches"],
     "same clean pass"),
])
def test_impossible_no_ssl_backbone_grad_settings_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


def test_reconstruction_pretraining_without_backbone_grad_is_allowed():
    args = parse_args(["--ssl_task", "reconstruction", "--ssl_mode", "pretrain", "--no-ssl_backbone_grad"])
    assert args.ssl_backbone_grad is False


def test_a_model_built_in_code_refuses_reconstruction_next_to_detection_without_backbone_grad():
    args = parse_args([*TINY, "--ssl_task", "reconstruction"])
    args.ssl_backbone_grad = False
    with pytest.raises(ValueError, match="reconstruction next to detection"):
        build_model(args)


def test_a_multitask_run_without_backbone_grad_through_the_cli(tmp_path):
    main([*TINY, "--num_workers", "0", "--backbone_norm", "batch", "--min_size", "128", "--max_size", "192",
          "--batch_size", "2", "--epochs", "1", "--limit_train_batches", "2", "--limit_val_batches", "1",
          "--ssl_task", "mim_continuous", "--no-ssl_backbone_grad", "--data_path", str(SAMPLE),
          "--output_dir", str(tmp_path)])
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert log["train_loss_ssl"] > 0 and log["train_loss_ce"] > 0
    assert "ssl_backbone_grad: false" in (tmp_path / "config.yaml").read_text()
