"""UP-DETR random query patches: crops, group masking, losses, official layout, training, round trip."""
from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare, ks_2samp, kstest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detr_ssl.__main__ import main
from detr_ssl.config import parse_args
from detr_ssl.engine.checkpoint import load_model_state, load_pretrained_encoder
from detr_ssl.models import build_model
from detr_ssl.models.criterion import SetCriterion
from detr_ssl.models.matcher import HungarianMatcher
from detr_ssl.methods.updetr import feature_reconstruction_loss
from detr_ssl.models.passes import ExtraQueries
from detr_ssl.ssl.updetr import (BLUR, BLUR_P, GREYSCALE, JITTER, JITTER_P, MIN_PIXEL, PATCH_SIZE, QUERY_AUGMENT,
                                 CropAugmentation, apply_augmentation, augment_patches, crop_patches, crop_targets,
                                 group_attention_mask, sample_crop_boxes, valid_sizes)
from detr_ssl.utils.image import denormalize
from detr_ssl.utils.misc import nested_tensor_from_tensor_list
from test_models import read_manifest
from test_ssl_cli import DEFORMABLE, SAMPLE, TINY, seeded_training_setup

PATCHES = ["--query_patches", "--num_patches", "5", "--feature_recon"]


def test_crop_boxes_lie_inside_the_valid_image_with_official_sizes(coco_images):
    torch.manual_seed(0)
    batch = nested_tensor_from_tensor_list(coco_images)  # two photos of different sizes, padded bottom-right
    sizes = valid_sizes(batch.mask)
    assert sizes.tolist() == [list(image.shape[-2:]) for image in coco_images]
    boxes = sample_crop_boxes(sizes, 2000)
    heights, widths = sizes[:, 0, None].float(), sizes[:, 1, None].float()
    x0, y0, x1, y1 = boxes.unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= widths).all() and (y1 <= heights).all()
    assert torch.equal(boxes, boxes.round())  # whole pixels
    crop_w, crop_h = x1 - x0, y1 - y0
    assert (crop_w >= MIN_PIXEL).all() and (crop_w <= widths - MIN_PIXEL).all()
    assert (crop_h >= MIN_PIXEL).all() and (crop_h <= heights - MIN_PIXEL).all()
    # sides spread uniformly over [8, side - 8]: means near the middle, independent of each other
    assert torch.allclose(crop_w.mean(1), widths[:, 0] / 2, rtol=0.05)
    assert abs(torch.corrcoef(torch.stack([crop_w[0], crop_h[0]]))[0, 1]) < 0.1
    # no crop touches padding, and the targets are its box normalised by the valid size
    targets = crop_targets(boxes[:, :3], sizes)
    for target, size, box in zip(targets, sizes, boxes[:, :3]):
        height, width = size.tolist()
        expected = torch.stack([(box[:, 0] + box[:, 2]) / 2 / width, (box[:, 1] + box[:, 3]) / 2 / height,
                                (box[:, 2] - box[:, 0]) / width, (box[:, 3] - box[:, 1]) / height], -1)
        torch.testing.assert_close(target["boxes"], expected)
        assert target["labels"].tolist() == [1, 1, 1]


def test_tiny_images_still_get_crops_of_at_least_one_pixel():
    boxes = sample_crop_boxes(torch.tensor([[5, 3]]), 50)
    sizes = boxes[..., 2:] - boxes[..., :2]
    assert (sizes >= 1).all() and (boxes[..., 2] <= 3).all() and (boxes[..., 3] <= 5).all()


def test_crops_are_the_image_pixels_under_the_box(coco_images):
    image = coco_images[0][None]
    box = torch.tensor([[[40.0, 30.0, 40.0 + PATCH_SIZE, 30.0 + PATCH_SIZE]]])
    patch = crop_patches(image, box)
    assert patch.shape == (1, 3, PATCH_SIZE, PATCH_SIZE)
    torch.testing.assert_close(patch[0], image[0, :, 30:30 + PATCH_SIZE, 40:40 + PATCH_SIZE])
    # a larger crop is shrunk by averaging: a 2x box gives the mean of each 2x2 block
    big = crop_patches(image, torch.tensor([[[0.0, 0.0, 2.0 * PATCH_SIZE, 2.0 * PATCH_SIZE]]]))
    pooled = torch.nn.functional.avg_pool2d(image[:, :, :2 * PATCH_SIZE, :2 * PATCH_SIZE], 2)
    torch.testing.assert_close(big, pooled)


def real_crops(coco_images, num_crops: int, size: int = PATCH_SIZE) -> torch.Tensor:
    """``num_crops`` random crops of a real photo as pixels in [0, 1]."""
    image = coco_images[0][None]
    boxes = sample_crop_boxes(torch.tensor([image.shape[-2:]]), num_crops)
    return denormalize(crop_patches(image, boxes, size))


def reference_augmentation(pixels: torch.Tensor, draw: CropAugmentation) -> torch.Tensor:
    """The crops one by one through torchvision's own transforms, with the given draw as their params."""
    out = []
    for i, crop in enumerate(pixels):
        if draw.jitter[i]:
            crop = JITTER.transform(crop, {"fn_idx": draw.order[i], "brightness_factor": float(draw.brightness[i]),
                                           "contrast_factor": float(draw.contrast[i]),
                                           "saturation_factor": float(draw.saturation[i]),
                                           "hue_factor": float(draw.hue[i])})
        if draw.grey[i]:
            crop = GREYSCALE.transform(crop, {"num_input_channels": 3})
        if draw.blur[i]:
            crop = BLUR.transform(crop, {"sigma": [float(draw.sigma[i])] * 2})
        out.append(crop)
    return torch.stack(out)


def test_batched_crop_augmentation_equals_torchvision_crop_by_crop(coco_images):
    torch.manual_seed(0)
    pixels = real_crops(coco_images, 64, 32)
    draw = CropAugmentation.sample(64)
    # the draw covers every case: each jitter step at each place of the order, each transform on and off
    assert all(set(draw.order[draw.jitter, k].tolist()) == {0, 1, 2, 3} for k in range(4))
    assert all(0 < flag.sum() < 64 for flag in (draw.jitter, draw.grey, draw.blur))
    before = pixels.clone()
    augmented = apply_augmentation(pixels, draw)
    assert torch.equal(pixels, before), "the input is left as it was"
    torch.testing.assert_close(augmented, reference_augmentation(pixels, draw), rtol=0, atol=1e-5)
    untouched = ~(draw.jitter | draw.grey | draw.blur)
    assert untouched.any() and torch.equal(augmented[untouched], pixels[untouched])
    assert augmented.min() >= 0 and augmented.max() <= 1 + 1e-6  # a blur's kernel sums to 1 up to rounding


def test_crop_augmentation_draws_follow_torchvision_distributions():
    """Over many crops: each transform applies with its probability, factors spread uniformly
    over torchvision's ranges, the jitter order is uniform over all 24, all independently."""
    n = 24000
    torch.manual_seed(0)
    draw = CropAugmentation.sample(n)
    for flag, p in ((draw.jitter, JITTER_P), (draw.grey, GREYSCALE.p), (draw.blur, BLUR_P)):
        assert flag.dtype == torch.bool and abs(flag.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert (JITTER.brightness, JITTER.contrast, JITTER.saturation, JITTER.hue) == ((0.6, 1.4),) * 3 + ((-0.1, 0.1),)
    assert tuple(BLUR.sigma) == (0.1, 2.0) and tuple(BLUR.kernel_size) == (13, 13)
    for values, (low, high) in ((draw.brightness, JITTER.brightness), (draw.contrast, JITTER.contrast),
                                (draw.saturation, JITTER.saturation), (draw.hue, JITTER.hue), (draw.sigma, BLUR.sigma)):
        assert kstest(((values - low) / (high - low)).numpy(), "uniform").pvalue > 1e-3
        assert low <= values.min() and values.max() <= high
    assert (draw.order.sort(1).values == torch.arange(4)).all(), "each order is a permutation of the four steps"
    frequencies = Counter(map(tuple, draw.order.tolist()))
    assert len(frequencies) == 24 and chisquare(list(frequencies.values())).pvalue > 1e-3
    fields = torch.stack([draw.jitter.float(), draw.grey.float(), draw.blur.float(), draw.brightness, draw.contrast,
                          draw.saturation, draw.hue, draw.sigma, draw.order[:, 0].float()])
    correlation = torch.corrcoef(torch.cat([fields[:, 1:], fields[:, :-1]]))  # also each crop with the next
    assert (correlation - torch.eye(len(correlation))).abs().max() < 4 / math.sqrt(n), "draws are independent"


def test_batched_crop_augmentation_matches_the_torchvision_pipeline_in_distribution(coco_images):
    """One real crop augmented many times, crop by crop by QUERY_AUGMENT and all at once: the
    brightness, colourfulness and sharpness of the results follow the same distributions."""
    torch.manual_seed(0)
    crop = real_crops(coco_images, 1, 16)
    n = 2000
    batched = apply_augmentation(crop.expand(n, -1, -1, -1), CropAugmentation.sample(n))
    reference = torch.stack([QUERY_AUGMENT(crop[0]) for _ in range(n)])

    def statistics(pixels: torch.Tensor) -> list[torch.Tensor]:
        return [pixels.mean((1, 2, 3)), pixels.std(1).mean((1, 2)), pixels.diff(dim=-1).abs().mean((1, 2, 3))]

    for ours, theirs in zip(statistics(batched), statistics(reference)):
        assert ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 1e-3


def test_augment_patches_keeps_normalised_crops_and_dtype(coco_images):
    torch.manual_seed(0)
    patches = crop_patches(coco_images[0][None], torch.tensor([[[0.0, 0.0, 64.0, 64.0]] * 6]), 32)
    augmented = augment_patches(patches)
    assert augmented.shape == patches.shape and augmented.dtype == patches.dtype
    assert not torch.equal(augmented, patches)
    assert augment_patches(patches.bfloat16()).dtype == torch.bfloat16


def test_group_mask_blocks_exactly_the_cross_group_pairs():
    mask = group_attention_mask(12, 3)
    for i in range(12):
        for j in range(12):
            assert bool(mask[i, j]) == (i // 4 != j // 4)
    with pytest.raises(ValueError, match="equal groups"):
        group_attention_mask(10, 3)


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
def test_decoder_groups_do_not_see_each_other(coco_batch, model_flags):
    """Changing one crop's features changes only its own group's outputs, in every decoder layer."""
    torch.manual_seed(0)
    args = parse_args([*TINY, *model_flags, *PATCHES, "--ssl_mode", "pretrain", "--dec_layers", "2"])
    model, _, _ = build_model(args)
    model.eval()  # no dropout, no augmentation, no slot dropping
    samples, _ = coco_batch
    method = model.ssl_method
    patch_queries = method.make_patch_queries(model, samples)

    def patch_outputs() -> dict:
        extra = ExtraQueries(patch_queries.queries, patch_queries.order, model.patch_attn_mask,
                             method.patch_class_heads(model))
        return method.patch_outputs(model, model.run(samples, decode=False, extra=extra), patch_queries)

    before = patch_outputs()
    per_group = args.num_queries // args.num_patches
    patch_queries.queries[:, per_group:2 * per_group] += 1.0  # the second crop
    after = patch_outputs()
    for layer_before, layer_after in zip([*before["aux_outputs"], before], [*after["aux_outputs"], after]):
        changed = (layer_before["pred_boxes"] - layer_after["pred_boxes"]).abs().amax((0, 2)) > 1e-6
        assert changed.tolist() == [per_group <= q < 2 * per_group for q in range(args.num_queries)]


@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
def test_patch_losses_are_zero_for_perfect_predictions(focal):
    torch.manual_seed(0)
    num_queries, num_patches, channels = 6, 3, 16
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.4, 0.2], [0.5, 0.5, 0.9, 0.9]])
    targets = [{"boxes": boxes, "labels": torch.ones(3, dtype=torch.int64)}]
    features = torch.randn(num_patches, channels)
    matched = [0, 2, 4]  # query 2k finds crop k
    pred_boxes = torch.full((1, num_queries, 4), 0.5)
    pred_boxes[0, matched] = boxes
    pred_features = torch.randn(1, num_queries, channels)
    pred_features[0, matched] = features * 3.0  # the same direction: normalised, they are equal
    classes = 2 if focal else 3
    logits = torch.full((1, num_queries, classes), -50.0)
    logits[0, matched, 1] = 50.0
    if not focal:
        logits[0, [1, 3, 5], 2] = 50.0  # no-object
    outputs = {"pred_logits": logits, "pred_boxes": pred_boxes, "pred_feature": pred_features,
               "gt_feature": features}
    classification = {"focal_alpha": 0.25} if focal else {"eos_coef": 0.1}
    criterion = SetCriterion(2, HungarianMatcher(1.0 if not focal else 2.0, 5.0, 2.0, focal=focal), {},
                             matched_losses={"feature": feature_reconstruction_loss}, **classification)
    losses = criterion.detection_set_losses(outputs, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_feature", "class_error", "cardinality_error"):
        assert losses[name].item() == pytest.approx(0.0, abs=1e-6), name
    pred_features[0, 0] = -features[0]  # opposite direction: |2 u|^2 = 4 for that match
    assert criterion.detection_set_losses(outputs, targets)["loss_feature"].item() == pytest.approx(4 / 3, rel=1e-5)


@pytest.mark.parametrize("manifest, flags", [
    ("updetr_r50_pretrain.tsv", ["--pre_norm", "--num_patches", "10", "--feature_recon", "--fre_cnn"]),
    ("updetr_r50_pretrain_parser_defaults.tsv", []),
])
def test_official_updetr_checkpoints_load_strictly(manifest, flags):
    args = parse_args(["--backbone_weights", "none", "--ssl_task", "updetr", "--ssl_mode", "pretrain",
                       "--dataset_file", "folder", *flags])
    model, _, _ = build_model(args)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = read_manifest(manifest)
    assert ours == expected
    generator = torch.Generator().manual_seed(0)
    official = {k: torch.randn(shape, generator=generator) for k, shape in expected.items()}
    report = load_model_state(model, official, logging.getLogger("test"), strict=True)
    assert report.exact
    index = json.loads((Path(__file__).parent / "fixtures" / "reference" / "index.json").read_text())
    entry = index[manifest.removesuffix(".tsv")]
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == entry["trainable_params"]


def test_official_updetr_checkpoint_starts_a_detector_with_pretrain(tmp_path):
    """An official pre-training checkpoint (with its argparse.Namespace) fine-tunes like the
    official detr_main.py --pretrain: everything but the classifier and patch heads loads."""
    pre_args = parse_args(["--backbone_weights", "none", "--query_patches", "--ssl_mode", "pretrain",
                           "--dataset_file", "folder", "--pre_norm", "--feature_recon", "--fre_cnn"])
    generator = torch.Generator().manual_seed(1)
    official = {k: torch.randn(shape, generator=generator) for k, shape in read_manifest("updetr_r50_pretrain.tsv").items()}
    torch.save({"model": official, "args": argparse.Namespace(lr=1e-4, pre_norm=True), "epoch": 59},
               tmp_path / "updetr.pth")
    assert pre_args.query_patches
    detector, _, _ = build_model(parse_args(["--backbone_weights", "none", "--pre_norm", "--num_classes", "5"]))
    report = load_pretrained_encoder(detector, tmp_path / "updetr.pth", logging.getLogger("test"))
    state = detector.state_dict()
    for key in ("transformer.decoder.layers.0.self_attn.in_proj_weight", "query_embed.weight",
                "bbox_embed.layers.2.weight", "transformer.encoder.norm.weight", "backbone.0.body.layer4.2.conv3.weight"):
        assert key in report.loaded and torch.equal(state[key], official[key])
    assert not any(k.startswith(("class_embed", "patch2query", "feature_align")) for k in report.loaded)
    assert set(report.missing) == {"class_embed.weight", "class_embed.bias"}


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
@pytest.mark.parametrize("encoder_task", ["none", "mim_continuous"])
def test_patch_localisation_loss_falls(coco_batch, model_flags, encoder_task):
    """Pre-training on real images, alone and next to an encoder task: the crops' box losses fall.
    Every step draws the same crops (the generator is reseeded), so the decoder can learn them."""
    model, criterion, optimizer = seeded_training_setup([*model_flags, *PATCHES, "--ssl_mode", "pretrain",
                                                         "--ssl_task", encoder_task, "--num_queries", "10"])
    samples, targets = coco_batch
    box_losses = []
    for step in range(40):
        torch.manual_seed(2)
        loss_dict = criterion(model(samples), targets)
        expected = {"loss_patch_ce", "loss_patch_bbox", "loss_patch_giou", "loss_patch_feature"}
        assert expected <= set(loss_dict) and ("loss_ssl" in loss_dict) == (encoder_task != "none")
        assert "loss_ce" not in loss_dict  # pre-training: no detection loss
        loss = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            decoder = model.transformer.decoder.layers[0].linear1.weight
            assert decoder.grad.abs().sum() > 0 and model.patch2query.weight.grad.abs().sum() > 0
        optimizer.step()
        box_losses.append(loss_dict["loss_patch_bbox"].item() + loss_dict["loss_patch_giou"].item())
    first, last = sum(box_losses[:3]) / 3, sum(box_losses[-5:]) / 5
    assert last < 0.8 * first, f"patch box loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
def test_pretrain_on_unlabelled_images_then_fine_tune(tmp_path, model_flags):
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    main([*TINY, *model_flags, *PATCHES, "--ssl_task", "reconstruction", "--ssl_mode", "pretrain",
          "--dataset_file", "folder", "--data_path", str(SAMPLE / "unlabelled"), "--output_dir", str(pre)])
    log = json.loads((pre / "log.jsonl").read_text().splitlines()[-1])
    assert {"train_loss_ssl", "train_loss_patch_bbox", "train_loss_patch_feature"} <= set(log)
    assert math.isfinite(log["train_loss"])
    events = EventAccumulator(str(pre / "tensorboard")).Reload()
    assert {"ssl/query_patches", "ssl/query_patch_boxes"} <= set(events.Tags()["images"])
    pretrained = torch.load(pre / "checkpoint.pth", weights_only=True)["model"]
    assert pretrained["class_embed.weight" if not model_flags else "class_embed.0.weight"].shape[0] in (2, 3)

    main([*TINY, *model_flags, "--data_path", str(SAMPLE), "--output_dir", str(fine), "--pretrain",
          str(pre / "checkpoint.pth")])
    messages = (fine / "log.txt").read_text()
    loaded = messages.split("--pretrain")[1]
    assert "transformer.decoder." in loaded and "query_embed.weight" in loaded
    fine_state = torch.load(fine / "checkpoint.pth", weights_only=True)["model"]
    assert not any(k.startswith(("patch2query", "feature_align", "ssl_head")) for k in fine_state)


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
def test_multitask_detection_with_query_patches_and_an_encoder_task(tmp_path, model_flags):
    main([*TINY, *model_flags, *PATCHES, "--ssl_task", "mim_continuous", "--data_path", str(SAMPLE),
          "--output_dir", str(tmp_path), "--query_patch_loss_coef", "0.5"])
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert {"train_loss_ce", "train_loss_ssl", "train_loss_patch_ce", "train_loss_patch_feature", "val_AP"} <= set(log)
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert "patch_class_embed.weight" in state and "patch2query.weight" in state


def test_query_patch_weights_follow_the_flags():
    args = parse_args(["--ssl_task", "updetr", "--query_patch_loss_coef", "0.5", "--feature_recon",
                       "--dec_layers", "3"])
    assert args.query_patches and args.ssl_task == "none"
    _, criterion, _ = build_model(parse_args(["--backbone_weights", "none", "--query_patches",
                                              "--query_patch_loss_coef", "0.5", "--feature_recon", "--dec_layers",
                                              "3"]))
    weights = criterion.weight_dict
    assert weights["loss_patch_bbox"] == 2.5 and weights["loss_patch_giou_1"] == 1.0
    assert weights["loss_patch_ce"] == 0.5 and weights["loss_patch_feature_0"] == 0.5
    assert weights["loss_bbox"] == 5.0 and "loss_patch_bbox_2" not in weights


@pytest.mark.parametrize("flags, message", [
    (["--query_patches", "--num_patches", "7"], "must be a positive multiple of --num_patches"),
    (["--feature_recon"], "add --query_patches"),
    (["--query_shuffle"], "add --query_patches"),
    (["--fre_cnn", "--lr_backbone", "1e-5"], "contradicts --lr_backbone"),
    (["--query_patches", "--query_patch_loss_coef", "-1"], "--query_patch_loss_coef must be >= 0"),
    (["--dataset_file", "folder", "--query_patches"], "use it with --ssl_mode pretrain"),
])
def test_impossible_query_patch_settings_fail_before_any_work(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


def test_fre_cnn_freezes_the_whole_backbone():
    args = parse_args(["--backbone_weights", "none", "--fre_cnn"])
    assert args.lr_backbone == 0.0
    model, _, _ = build_model(args)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_query_patch_pretraining_trains_the_backbone_at_lr_as_the_official_code():
    assert parse_args(["--query_patches", "--ssl_mode", "pretrain"]).lr_backbone == 1e-4
    assert parse_args(["--query_patches", "--ssl_mode", "pretrain", "--lr_backbone", "1e-5"]).lr_backbone == 1e-5
    assert parse_args(["--query_patches"]).lr_backbone == 1e-5  # multi-task: the detection recipe
    assert parse_args(["--query_patches", "--ssl_mode", "pretrain", "--fre_cnn"]).lr_backbone == 0.0
