"""MAE pre-training of a ViT backbone (--ssl_method mae / --ssl_task mae): masking, the encoder
seeing only the visible patches, the loss, the recipe defaults, the crops of mixed-size photos,
and the checkpoint that --backbone_weights / --pretrain start detection from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")

from detr_ssl.__main__ import main  # noqa: E402
from detr_ssl.config import parse_args  # noqa: E402
from detr_ssl.data import build_dataset, collate_fn  # noqa: E402
from detr_ssl.engine.optim import build_optimizer  # noqa: E402
from detr_ssl.engine.runner import build_method_dataset  # noqa: E402
from detr_ssl.methods.mae import normalised_patches, sincos_position_table  # noqa: E402
from detr_ssl.models import build_model  # noqa: E402
from detr_ssl.models.vit import VIT_KEY_PREFIX, build_vit, load_vit_weights  # noqa: E402
from detr_ssl.ssl.patches import patchify, token_to_pixel_mask  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
UNLABELLED = REPO_ROOT / "data" / "sample" / "unlabelled"
SIZE = 64  # 4 x 4 patches of 16 px
TINY_MAE = ["--ssl_task", "mae", "--ssl_mode", "pretrain", "--dataset_file", "folder", "--data_path", str(UNLABELLED),
            "--backbone", "vit_tiny_patch16", "--mae_input_size", str(SIZE), "--mae_decoder_dim", "64",
            "--mae_decoder_depth", "2", "--mae_decoder_heads", "4", "--hidden_dim", "64", "--nheads", "4",
            "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64", "--device", "cpu",
            "--num_workers", "0", "--batch_size", "4"]


def mae_model(*flags: str):
    args = parse_args([*TINY_MAE, *flags])
    model, criterion, _ = build_model(args)
    return args, model, criterion


def photo_batch(args, image_set: str = "train") -> torch.Tensor:
    """The unlabelled photos (mixed sizes) through the method's own pipeline, as one batch."""
    torch.manual_seed(0)
    dataset = build_method_dataset(image_set, args)
    samples, _ = collate_fn([dataset[i] for i in range(4)])
    return samples


def test_photos_of_mixed_sizes_become_unpadded_crops_of_the_input_size():
    sizes = {Image.open(path).size for path in UNLABELLED.iterdir()}
    assert len(sizes) > 2  # the test means something only on mixed sizes
    args = parse_args(TINY_MAE)
    for image_set in ("train", "val"):
        samples = photo_batch(args, image_set)
        assert samples.tensors.shape == (4, 3, SIZE, SIZE) and not samples.mask.any()
    first, again = (build_method_dataset("val", args)[0][0] for _ in range(2))
    assert torch.equal(first, again)  # validation crops are the centre: the same every epoch


def test_each_image_masks_exactly_round_ratio_of_its_patches_and_images_differ():
    args, model, _ = mae_model("--mae_input_size", "96", "--ssl_ratio", "0.7")  # 36 patches: 25.2 -> 25
    model.train()
    outputs = model(photo_batch(args))["mae_outputs"]
    masked = outputs["masked"]
    assert masked.shape == (4, 6, 6)
    assert masked.flatten(1).sum(1).tolist() == [round(0.7 * 36)] * 4
    assert len({tuple(m.flatten().tolist()) for m in masked}) == 4
    assert outputs["prediction"].shape == (4, 36, 16 * 16 * 3)


def test_the_encoder_sees_only_the_visible_patches():
    """Changing the pixels under the masked patches changes no prediction (validation masks are fixed)."""
    args, model, _ = mae_model()
    model.eval()
    samples = photo_batch(args)
    with torch.no_grad():
        before = model(samples)["mae_outputs"]
        pixels = token_to_pixel_mask(before["masked"], 16).expand_as(samples.tensors)
        samples.tensors[pixels] = torch.randn(int(pixels.sum()))
        after = model(samples)["mae_outputs"]
    assert torch.equal(before["masked"], after["masked"])
    torch.testing.assert_close(after["prediction"], before["prediction"])
    samples.tensors[~pixels] += 1.0  # a visible pixel does change them
    with torch.no_grad():
        assert not torch.allclose(model(samples)["mae_outputs"]["prediction"], before["prediction"])


def test_loss_is_the_masked_patches_mean_squared_error_on_normalised_pixels():
    args, model, criterion = mae_model()
    model.train()
    outputs = model(photo_batch(args))
    mae = outputs["mae_outputs"]
    patches = patchify(mae["images"], 16).flatten(1, 2)
    mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    error = ((mae["prediction"] - (patches - mean) / std) ** 2).mean(-1)
    expected = error[mae["masked"].flatten(1)].mean()
    losses = criterion(outputs, [{}] * 4)
    torch.testing.assert_close(losses["loss_mae"], expected)
    assert set(criterion.weight_dict) >= {"loss_mae"} and "loss_ce" not in losses
    torch.testing.assert_close(normalised_patches(patches).std(-1), torch.ones(4, 16), atol=1e-3, rtol=0)


def test_loss_falls_in_a_few_steps_on_the_photos():
    args, model, criterion = mae_model("--lr", "1e-3", "--warmup_epochs", "0")
    optimizer = build_optimizer(model, args)
    samples = photo_batch(args)
    model.train()
    losses = []
    for _ in range(25):
        loss = criterion(model(samples), [{}] * 4)["loss_mae"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses


def test_only_the_vit_and_the_decoder_train_and_the_position_table_is_mae_s_fixed_one():
    args, model, _ = mae_model()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith((VIT_KEY_PREFIX, "mae_decoder.")) for name in trainable)
    assert any(name.startswith("mae_decoder.") for name in trainable)
    vit = model.backbone[0].body.vit
    assert not vit.pos_embed.requires_grad
    torch.testing.assert_close(vit.pos_embed[0], sincos_position_table(14, 14, vit.embed_dim))
    groups = build_optimizer(model, args).param_groups
    assert {tuple(g["betas"]) for g in groups} == {(0.9, 0.95)}
    assert {g["weight_decay"] for g in groups} == {0.05, 0.0}  # none on norms and biases


def test_sincos_table_follows_mae_s_layout():
    table = sincos_position_table(3, 5, 16)  # dim/4 = 4 frequencies 10000^(-k/4)
    row, column = 2, 3
    entry = table[row * 5 + column]
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cat([(column * omega).sin(), (column * omega).cos(), (row * omega).sin(), (row * omega).cos()])
    torch.testing.assert_close(entry, expected.float())


def test_recipe_defaults_are_mae_s_and_given_flags_win():
    args = parse_args(TINY_MAE)
    assert args.lr == pytest.approx(1.5e-4 * 4 / 256) and args.lr_backbone == args.lr
    assert (args.weight_decay, list(args.adam_betas), args.lr_scheduler, args.warmup_epochs, args.epochs,
            args.clip_max_norm, args.no_decay_norm_bias, args.ssl_ratio, args.backbone_weights, args.drop_path) == (
        0.05, [0.9, 0.95], "cosine", 40.0, 800, 0.0, True, 0.75, "none", 0.0)
    accumulated = parse_args([*TINY_MAE, "--accum_steps", "8", "--mae_base_lr", "1e-3"])
    assert accumulated.lr == pytest.approx(1e-3 * 32 / 256)
    given = parse_args([*TINY_MAE, "--lr", "0.01", "--weight_decay", "0.1", "--warmup_iters", "5", "--epochs", "3"])
    assert (given.lr, given.lr_backbone, given.weight_decay, given.warmup_epochs, given.epochs) == (0.01, 0.01, 0.1,
                                                                                                   0.0, 3)


@pytest.mark.parametrize("flags, message", [
    (["--backbone", "resnet50"], "use --backbone vit_*, not resnet50"),
    (["--adam_betas", "0.9", "1.0"], "--adam_betas must each be in [0, 1)"),
    (["--ssl_method", "mae", "--ssl_task", "mim_continuous"], "cannot run next to --ssl_task"),
    (["--mae_input_size", "100"], "--mae_input_size must be a positive multiple"),
    (["--mae_decoder_dim", "66"], "--mae_decoder_dim 66"),
    (["--lr_backbone", "0"], "--lr_backbone must be > 0"),
    (["--ssl_mode", "multitask"], "--ssl_mode pretrain"),
])
def test_impossible_flags_are_refused_by_name(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args([*TINY_MAE, *flags])
    assert message in capsys.readouterr().err


def test_cli_pretrains_shows_pictures_and_its_checkpoint_starts_a_vit_detector(tmp_path):
    run = tmp_path / "mae"
    main([*TINY_MAE, "--epochs", "2", "--warmup_epochs", "1", "--val_path", str(UNLABELLED), "--vis_every", "1",
          "--output_dir", str(run)])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1] and all("val_loss_mae" in entry for entry in log)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert any(tag.endswith("ssl/mae") for tag in events.Tags()["images"]), events.Tags()["images"]

    trained = torch.load(run / "checkpoint.pth", weights_only=True)["model"]
    vit = build_vit("vit_tiny_patch16", 0.0)
    ignored = load_vit_weights(vit, str(run / "checkpoint.pth"), "vit_tiny_patch16")
    assert any(key.startswith("mae_decoder.") for key in ignored)
    for key, value in vit.state_dict().items():
        assert torch.equal(value, trained[VIT_KEY_PREFIX + key]), key

    detection = ["--data_path", str(REPO_ROOT / "data" / "sample"), "--backbone", "vit_tiny_patch16",
                 "--device", "cpu", "--num_workers", "0", "--hidden_dim", "64", "--nheads", "4", "--enc_layers", "1",
                 "--dec_layers", "1", "--dim_feedforward", "64", "--num_queries", "10", "--pyramid_channels", "64",
                 "--min_size", "128", "--max_size", "160", "--epochs", "1", "--limit_train_batches", "1"]
    main([*detection, "--backbone_weights", str(run / "checkpoint.pth"), "--output_dir", str(tmp_path / "ft")])
    main([*detection, "--backbone_weights", "none", "--pretrain", str(run / "checkpoint.pth"),
          "--output_dir", str(tmp_path / "ft_pretrain")])
    finetuned = torch.load(tmp_path / "ft_pretrain" / "checkpoint.pth", weights_only=True)["model"]
    assert not any(key.startswith("mae_decoder.") for key in finetuned)
    first_losses = [json.loads((tmp_path / run / "log.jsonl").read_text().splitlines()[0])["train_loss"]
                    for run in ("ft", "ft_pretrain")]
    assert first_losses[0] == pytest.approx(first_losses[1], rel=1e-6)  # both start from the same ViT


def test_eval_of_a_pretraining_checkpoint_repeats_its_validation_loss(tmp_path):
    """Validation masks are drawn from a fixed seed, so the validation loss is a number to compare."""
    from detr_ssl.engine.runner import run

    common = [*TINY_MAE, "--val_path", str(UNLABELLED)]
    main([*common, "--epochs", "1", "--output_dir", str(tmp_path / "mae")])
    trained = json.loads((tmp_path / "mae" / "log.jsonl").read_text().splitlines()[-1])["val_loss_mae"]
    stats = run(parse_args([*common, "--eval", "--resume", str(tmp_path / "mae" / "checkpoint.pth"),
                            "--output_dir", str(tmp_path / "eval")]))
    assert stats["loss_mae"] == pytest.approx(trained, rel=1e-6)
