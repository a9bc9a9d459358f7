"""Encoder pretext tasks through the CLI: every task x mode x model runs, pre-training feeds fine-tuning."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from detr_ssl.__main__ import main
from detr_ssl.config import parse_args
from detr_ssl.models import build_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "data" / "sample"
TINY = ["--device", "cpu", "--num_workers", "0", "--backbone", "resnet18", "--backbone_weights", "none",
        "--backbone_norm", "batch", "--hidden_dim", "64", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1",
        "--dim_feedforward", "128", "--num_queries", "10", "--min_size", "128", "--max_size", "192",
        "--batch_size", "2", "--epochs", "1", "--limit_train_batches", "1", "--limit_val_batches", "1",
        "--vis_every", "1"]
DEFORMABLE = ["--model", "deformable_detr", "--num_feature_levels", "3", "--msda_backend", "pytorch"]
CONTINUOUS = ["reconstruction", "mim_continuous", "jigsaw_continuous", "jigsaw_discrete"]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> dict[int, Path]:
    """Small k-means tokenizers fitted on the sample's unlabelled photos, for patch sizes 32 (DETR) and 8."""
    from detr_ssl.ssl.tokenizer import fit_kmeans_tokenizer_on_folder

    out = {}
    for patch in (32, 8):
        path = tmp_path_factory.mktemp("tok") / f"tokenizer_p{patch}.pt"
        fit_kmeans_tokenizer_on_folder(SAMPLE / "unlabelled", path, codebook_size=8, patch_size=patch, iters=3,
                                       image_size=128, max_patches=2000)
        out[patch] = path
    return out


def task_flags(task: str, model_flags: list[str], tokenizers: dict[int, Path]) -> list[str]:
    flags = ["--ssl_task", task]
    if task == "mim_discrete":
        flags += ["--tokenizer", str(tokenizers[8 if model_flags else 32])]
    return flags


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
@pytest.mark.parametrize("task", CONTINUOUS + ["mim_discrete"])
def test_multitask_run_adds_the_ssl_loss_and_logs_images(tmp_path, model_flags, task, tokenizer_file):
    main([*TINY, *model_flags, *task_flags(task, model_flags, tokenizer_file), "--data_path", str(SAMPLE),
          "--output_dir", str(tmp_path), "--ssl_mode", "multitask"])
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert log["train_loss_ssl"] > 0 and log["train_loss_ce"] > 0 and "val_AP" in log
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert any(k.startswith("ssl_head.") for k in checkpoint["model"])


def tensorboard_tags(run_dir: Path) -> dict[str, list[str]]:
    """The scalar and image tags of a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return events.Tags()


@pytest.mark.parametrize("flags", [["--ssl_task", "mim_continuous"], ["--query_patches", "--num_patches", "5"]],
                         ids=["mim", "query_patches"])
def test_pretraining_reports_a_validation_loss_per_epoch_and_eval_repeats_it(tmp_path, flags):
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    for name in ("coffee.png", "rocket.jpg"):  # held out: the training folder is the other photos
        (held_out / name).write_bytes((SAMPLE / "unlabelled" / name).read_bytes())
    train_dir = tmp_path / "train_images"
    train_dir.mkdir()
    for path in (SAMPLE / "unlabelled").iterdir():
        if path.name not in ("coffee.png", "rocket.jpg"):
            (train_dir / path.name).write_bytes(path.read_bytes())
    common = [*TINY, *flags, "--ssl_mode", "pretrain", "--dataset_file", "folder", "--data_path", str(train_dir),
              "--val_path", str(held_out)]
    main([*common, "--output_dir", str(tmp_path / "pre"), "--epochs", "2"])
    log = [json.loads(line) for line in (tmp_path / "pre" / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1]
    assert "pre-training: no detection classes" in (tmp_path / "pre" / "log.txt").read_text()
    assert all(record["val_loss"] > 0 for record in log) and log[0]["val_loss"] != log[1]["val_loss"]
    tags = tensorboard_tags(tmp_path / "pre")
    assert "val/loss" in tags["scalars"] and any(tag.startswith("val/ssl/") for tag in tags["images"])

    stats = main_stats([*common, "--eval", "--resume", str(tmp_path / "pre" / "checkpoint.pth"),
                        "--output_dir", str(tmp_path / "eval")])
    assert stats["loss"] == pytest.approx(log[-1]["val_loss"], rel=1e-6)  # the same corruption every evaluation
    assert "epoch 1 val (pretext task on 1 held-out batches)" in (tmp_path / "eval" / "log.txt").read_text()


def main_stats(argv: list[str]) -> dict:
    """Run the CLI in-process and return what ``run`` returned (the last evaluation's stats)."""
    from detr_ssl.engine.runner import run

    return run(parse_args(argv))


def test_validation_leaves_the_training_random_stream_alone(tmp_path):
    common = [*TINY, "--ssl_task", "jigsaw_continuous", "--ssl_mode", "pretrain", "--dataset_file", "folder",
              "--data_path", str(SAMPLE / "unlabelled"), "--epochs", "2", "--deterministic", "--no-tensorboard"]
    main([*common, "--output_dir", str(tmp_path / "plain")])
    main([*common, "--val_path", str(SAMPLE / "unlabelled"), "--output_dir", str(tmp_path / "validated")])
    plain, validated = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=True)["model"]
                        for run in ("plain", "validated"))
    assert all(torch.equal(value, validated[key]) for key, value in plain.items())


def test_eval_of_a_folder_pretraining_needs_held_out_images(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--ssl_task", "mim_continuous", "--ssl_mode", "pretrain", "--dataset_file", "folder",
                    "--data_path", str(SAMPLE / "unlabelled"), "--eval"])
    assert "pass --val_path DIR" in capsys.readouterr().err


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
def test_pretrain_on_unlabelled_images_then_fine_tune_with_pretrain(tmp_path, model_flags):
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    main([*TINY, *model_flags, "--ssl_task", "mim_continuous", "--ssl_mode", "pretrain", "--dataset_file", "folder",
          "--data_path", str(SAMPLE / "unlabelled"), "--output_dir", str(pre), "--epochs", "2"])
    log = [json.loads(line) for line in (pre / "log.jsonl").read_text().splitlines()]
    assert set(k for k in log[0] if k.startswith("train_loss")) == {"train_loss", "train_loss_ssl"}
    pretrained = torch.load(pre / "checkpoint.pth", weights_only=True)["model"]

    main([*TINY, *model_flags, "--data_path", str(SAMPLE), "--output_dir", str(fine), "--pretrain",
          str(pre / "checkpoint.pth"), "--epochs", "1"])
    messages = (fine / "log.txt").read_text()
    assert "--pretrain" in messages and "ssl_head." in messages.split("skipped")[1].split("\n")[0]
    assert "newly initialised" in messages and "class_embed" in messages.split("newly initialised")[1]
    # the encoder came from pre-training; the fine-tuned model has no ssl head
    args = parse_args([*TINY, *model_flags, "--data_path", str(SAMPLE), "--num_classes", "91"])
    model, _, _ = build_model(args)
    from detr_ssl.engine.checkpoint import load_pretrained_encoder

    report = load_pretrained_encoder(model, pre / "checkpoint.pth", logging.getLogger("test"))
    assert report.loaded and all(k.startswith(("backbone.", "input_proj.", "transformer.")) for k in report.loaded)
    assert not any(k.startswith("ssl_head.") for k in model.state_dict())
    encoder_key = next(k for k in report.loaded if k.startswith("transformer.encoder."))
    assert torch.equal(model.state_dict()[encoder_key], pretrained[encoder_key])
    fine_state = torch.load(fine / "checkpoint.pth", weights_only=True)["model"]
    assert not any(k.startswith("ssl_head.") for k in fine_state)


@pytest.mark.parametrize("flags, message", [
    (["--ssl_mode", "pretrain"], "--ssl_mode pretrain needs a pretext task"),
    (["--ssl_task", "mim_discrete"], "needs --tokenizer"),
    (["--dataset_file", "folder", "--ssl_task", "mim_continuous"], "use it with --ssl_mode pretrain"),
    (["--ssl_task", "mim_continuous", "--ssl_ratio", "1.5"], "--ssl_ratio must be in [0, 1]"),
])
def test_impossible_ssl_settings_fail_before_any_work(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


def test_tokenizer_with_another_patch_size_is_refused(tokenizer_file):
    args = parse_args(TINY + ["--ssl_task", "mim_discrete", "--tokenizer", str(tokenizer_file[8]),
                              "--data_path", str(SAMPLE)])
    with pytest.raises(ValueError, match="patch"):
        build_model(args)


def seeded_training_setup(flags: list[str]) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """A TINY model (seed 0, no dropout) in training mode, its criterion, and AdamW at 1e-3 on its
    trainable parameters: the set-up of the tests whose losses must fall."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(parse_args([*TINY, *flags, "--lr", "1e-3", "--dropout", "0"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, criterion, optimizer


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
@pytest.mark.parametrize("task", ["reconstruction", "mim_continuous", "jigsaw_continuous"])
def test_ssl_loss_trains_the_encoder_and_backbone_and_falls(coco_batch, model_flags, task):
    """Pre-training through the whole model on real images: the model corrupts its own input, the
    head learns from the encoder tokens of that corrupted input (gradients reach encoder and
    backbone), and the SSL loss falls over a few dozen steps."""
    model, criterion, optimizer = seeded_training_setup([*model_flags, "--ssl_task", task, "--ssl_mode", "pretrain",
                                                         "--num_classes", "91", "--lr_backbone", "1e-3"])
    samples, targets = coco_batch
    losses = []
    for step in range(40):
        outputs = model(samples)
        loss_dict = criterion(outputs, targets)
        assert set(loss_dict) == {"loss_ssl"}
        corrupted = not torch.equal(outputs["ssl_outputs"]["corrupted"], outputs["ssl_outputs"]["images"])
        assert corrupted == (task != "reconstruction")
        optimizer.zero_grad()
        loss_dict["loss_ssl"].backward()
        if step == 0:
            encoder = next(p for n, p in model.named_parameters() if n.startswith("transformer.encoder."))
            backbone = model.backbone[0].body.layer4[0].conv1.weight
            assert encoder.grad.abs().sum() > 0 and backbone.grad.abs().sum() > 0
            decoder = [p for n, p in model.named_parameters() if n.startswith("transformer.decoder.")]
            assert all(p.grad is None for p in decoder)  # pre-training does not run the decoder
        optimizer.step()
        losses.append(loss_dict["loss_ssl"].item())
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], f"{task}: loss {losses[0]:.3f} -> {losses[-5:]}"


@pytest.mark.parametrize("task", ["mim_continuous", "jigsaw_discrete"])
def test_ssl_levels_adds_a_pixel_loss_on_every_other_level(tmp_path, task):
    main([*TINY, *DEFORMABLE, "--ssl_task", task, "--ssl_levels", "--ssl_mode", "pretrain", "--dataset_file",
          "folder", "--data_path", str(SAMPLE / "unlabelled"), "--output_dir", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    # three levels (strides 8, 16, 32): the task's head on the first, pixel heads on the others
    assert state["ssl_head.level_heads.heads.0.weight"].shape == (16 * 16 * 3, 64)
    assert state["ssl_head.level_heads.heads.1.weight"].shape == (32 * 32 * 3, 64)
    assert json.loads((tmp_path / "log.jsonl").read_text())["train_loss_ssl"] > 0


def test_level_heads_score_zero_for_the_original_pixels(coco_images):
    from detr_ssl.ssl.levels import LevelHeads
    from detr_ssl.ssl.patches import patchify

    images = torch.stack([torch.nn.functional.interpolate(im[None], size=(128, 192))[0] for im in coco_images])
    valid = torch.ones(2, 128, 192, dtype=torch.bool)
    valid[1, 96:] = False  # padding never counts
    changed = torch.zeros_like(valid)
    changed[:, :64, :64] = True
    heads = LevelHeads(8, [16, 32])
    perfect = [patchify(images, 16), patchify(images, 32)]
    assert heads.loss(perfect, images, valid, changed).item() == 0.0
    wrong = [p + 1.0 for p in perfect]
    assert heads.loss(wrong, images, valid, changed).item() == pytest.approx(1.0)
    wrong_outside = [patchify(images + 5.0 * ~changed[:, None], stride) for stride in (16, 32)]
    assert heads.loss(wrong_outside, images, valid, changed).item() == 0.0  # only changed pixels count


def test_ssl_levels_is_refused_where_there_is_one_level(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--ssl_task", "mim_continuous", "--ssl_levels"])
    assert "--ssl_levels needs" in capsys.readouterr().err
