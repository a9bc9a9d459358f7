"""The DETR transforms move boxes exactly with the pixels, at the sizes asked for."""
from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detr_ssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomSizeCrop, build_transforms
from detr_ssl.utils.box_ops import cxcywh_to_xyxy

BUSY_IMAGE = 2  # the sample val image with the most boxes (9)


def to_pixels(target: dict) -> torch.Tensor:
    """Normalised cxcywh target boxes -> absolute XYXY on the transformed image."""
    height, width = target["size"].tolist()
    return cxcywh_to_xyxy(target["boxes"]) * torch.tensor([width, height, width, height])


def resized_reference(image, size: tuple[int, int]) -> torch.Tensor:
    """The photo resized to ``size`` and normalised, without any flip or crop."""
    pixels = F.resize(F.pil_to_tensor(image), list(size))
    return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


def scale_of(image, out: torch.Tensor) -> torch.Tensor:
    height, width = out.shape[-2:]
    return torch.tensor([width / image.width, height / image.height] * 2)


@pytest.mark.parametrize(("min_size", "max_size"), [(800, 1333), (320, 400), (256, 256)])
def test_val_resize_scales_boxes_by_the_image_factor(raw_val, min_size, max_size):
    transform = build_transforms("val", min_size, max_size)
    for image, target in raw_val:
        out, out_target = transform(image, target)
        height, width = out.shape[-2:]
        short, long = sorted((height, width))
        assert long <= max_size and (short == min_size or long == max_size)
        assert abs(width * image.height - height * image.width) <= max(image.size)  # aspect kept to a pixel
        assert out_target["size"].tolist() == [height, width]
        assert out_target["orig_size"].tolist() == [image.height, image.width]
        expected = target["boxes"] * scale_of(image, out)
        torch.testing.assert_close(to_pixels(out_target), expected, atol=1e-3, rtol=0)
        torch.testing.assert_close(out, resized_reference(image, (height, width)))


def test_train_sizes_are_the_official_scales_times_min_size_over_800(raw_val):
    min_size, max_size = 400, 560
    scales = set(range(240, 401, 16))  # 480..800 step 32, halved
    transform = build_transforms("train", min_size, max_size)
    torch.manual_seed(0)
    shorter_sides = set()
    for _ in range(5):
        for image, target in raw_val:
            out, out_target = transform(image, target)
            short, long = sorted(out.shape[-2:])
            assert long <= max_size
            assert short in scales or long == max_size
            assert ((out_target["boxes"] >= 0) & (out_target["boxes"] <= 1)).all()
            shorter_sides.add(short)
    assert len(shorter_sides) >= 4


def test_train_flip_moves_boxes_with_their_pixels(raw_val):
    image, target = raw_val[BUSY_IMAGE]
    transform = build_transforms("train", 320, 480)
    torch.manual_seed(1)
    seen = set()
    for _ in range(30):
        out, out_target = transform(image, target)
        height, width = out.shape[-2:]
        if abs(width * image.height - height * image.width) > max(image.size):
            continue  # the crop branch: covered by the tests below
        reference = resized_reference(image, (height, width))
        error = (out - reference).abs().mean().item()
        mirrored_error = (out - reference.flip(-1)).abs().mean().item()
        flipped = mirrored_error < error
        assert min(error, mirrored_error) < 0.02 < 0.1 < max(error, mirrored_error)
        expected = target["boxes"] * scale_of(image, out)
        if flipped:
            expected = torch.stack([width - expected[:, 2], expected[:, 1], width - expected[:, 0], expected[:, 3]], 1)
        torch.testing.assert_close(to_pixels(out_target), expected, atol=1e-3, rtol=0)
        for x1, y1, x2, y2 in expected.round().int().tolist():
            inside = out[:, y1:y2, x1:x2]
            source = reference[:, y1:y2, width - x2:width - x1].flip(-1) if flipped else reference[:, y1:y2, x1:x2]
            assert (inside - source).abs().mean() < 0.02
        seen.add(flipped)
    assert seen == {True, False}


def test_random_size_crop_clips_boxes_and_drops_empty_ones_with_their_labels(raw_val):
    pil_image, target = raw_val[BUSY_IMAGE]
    image = tv_tensors.Image(F.pil_to_tensor(pil_image))
    labels = torch.arange(len(target["labels"]))  # distinct, so a misaligned label shows
    target = {**target, "labels": labels}
    crop = RandomSizeCrop(100, 300)
    dropped = clipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        params = crop.make_params([image])
        torch.manual_seed(seed)
        out, out_target = crop(image, target)
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        assert 100 <= height <= 300 and 100 <= width <= 300
        assert torch.equal(out, image[:, top:top + height, left:left + width])
        shifted = target["boxes"] - torch.tensor([left, top, left, top])
        expected = shifted.clamp(min=0).minimum(torch.tensor([width, height, width, height]))
        keep = (expected[:, 2] - expected[:, 0] >= 1) & (expected[:, 3] - expected[:, 1] >= 1)
        torch.testing.assert_close(out_target["boxes"].as_subclass(torch.Tensor), expected[keep])
        assert out_target["boxes"].canvas_size == (height, width)
        assert torch.equal(out_target["labels"], labels[keep])
        assert torch.equal(out_target["iscrowd"], target["iscrowd"][keep])
        dropped += int((~keep).sum())
        clipped += int((expected[keep] != shifted[keep]).any(1).sum())
    assert dropped > 0 and clipped > 0


def test_random_size_crop_never_exceeds_the_image(raw_val):
    image = tv_tensors.Image(F.pil_to_tensor(raw_val[0][0]))  # 640x481 px
    small = F.resize(image, [200, 150])
    crop = RandomSizeCrop(384, 600)
    for _ in range(10):
        params = crop.make_params([small])
        assert (params["height"], params["width"]) == (200, 150)
        params = crop.make_params([image])
        assert 384 <= params["height"] <= 600 and 384 <= params["width"] <= 481


def test_train_pipeline_keeps_every_box_on_its_object(raw_val):
    """Boxes and per-object masks go through the same random flips, resizes and crops."""
    image, target = raw_val[BUSY_IMAGE]
    count = len(target["boxes"])
    masks = torch.zeros(count, image.height, image.width, dtype=torch.uint8)
    for index, (x1, y1, x2, y2) in enumerate(target["boxes"].round().int().tolist()):
        masks[index, y1:y2, x1:x2] = index + 1
    target = {**target, "labels": torch.arange(count), "masks": tv_tensors.Mask(masks)}
    transform = build_transforms("train", 320, 480)
    torch.manual_seed(2)
    counts = set()
    for _ in range(30):
        out, out_target = transform(image, target)
        boxes = out_target["boxes"]
        assert boxes.dtype == torch.float32 and ((boxes >= 0) & (boxes <= 1)).all()
        assert out_target["size"].tolist() == list(out.shape[-2:])
        assert len(boxes) == len(out_target["labels"]) == len(out_target["masks"]) == len(out_target["area"])
        pixels = to_pixels(out_target)
        for box, label, mask in zip(pixels, out_target["labels"], out_target["masks"]):
            assert mask.max() == label + 1
            ys, xs = torch.nonzero(mask, as_tuple=True)
            mask_box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert (box - mask_box).abs().max() <= 3  # mask drawn on rounded boxes, resized nearest
        sides = pixels[:, 2:] - pixels[:, :2]
        torch.testing.assert_close(out_target["area"], sides.prod(1), rtol=1e-4, atol=1e-2)
        counts.add(len(boxes))
    assert len(counts) > 1  # some crops dropped boxes


def test_train_without_augment_is_the_val_transform(raw_val):
    image, target = raw_val[0]
    train_out, train_target = build_transforms("train", 320, 480, augment=False)(image, target)
    val_out, val_target = build_transforms("val", 320, 480)(image, target)
    assert torch.equal(train_out, val_out)
    assert all(torch.equal(train_target[key], val_target[key]) for key in val_target)


def test_unknown_image_set_is_refused():
    with pytest.raises(ValueError, match="'test'"):
        build_transforms("test")
