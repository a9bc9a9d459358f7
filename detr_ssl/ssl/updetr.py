"""UP-DETR's random query patches (Dai et al., 2021): crops of the image that the decoder must find.

Crops are cut from the batch the model receives (already augmented and normalised), so their
boxes are exact in the coordinates the detector predicts and any dataset (labelled or not)
can serve. Sizes follow UP-DETR: width and height are drawn independently and uniformly in
[MIN_PIXEL, side - MIN_PIXEL] of the image's valid (unpadded) extent, the position uniformly
over all placements that keep the crop inside. Every crop is resized to PATCH_SIZE x PATCH_SIZE
(``roi_align``, which averages when it shrinks) and, in training, colour-augmented as the
official SimCLR-style query transform.

The decoder's queries form one group per crop; ``group_attention_mask`` keeps the groups from
attending to each other in decoder self-attention.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, roi_align
from torchvision.transforms import v2
from torchvision.utils import draw_bounding_boxes

from detr_ssl.utils.image import denormalize, normalize

PATCH_SIZE = 128  # crops are resized to this square, as the official query transform
MIN_PIXEL = 8  # smallest crop side and margin, in pixels of the valid image (official min_pixel)
PATCH_DROP_RATIO = 0.1  # training drops this fraction of the query slots' patch features (official mask_ratio)
PATCH_LABEL = 1  # class of every crop; the classifier has 2 classes + no-object, as the official model
PATCH_NUM_CLASSES = 2

# SimCLR-style colour augmentation of the crops (official get_query_transforms('train')); no flip.
_QUERY_AUGMENT = v2.Compose([
    v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
    v2.RandomGrayscale(p=0.2),
    v2.RandomApply([v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))], p=0.5),
])


def valid_sizes(padding_mask: Tensor) -> Tensor:
    """(B, H, W) padding mask (True on padding, bottom-right) -> (B, 2) valid (height, width)."""
    return torch.stack([(~padding_mask[:, :, 0]).sum(1), (~padding_mask[:, 0, :]).sum(1)], 1)


def _uniform_int(low: Tensor, high: Tensor) -> Tensor:
    """Integers drawn uniformly in [low, high] (inclusive), elementwise."""
    return low + (torch.rand(low.shape, device=low.device) * (high - low + 1)).floor().clamp(max=high - low)


def sample_crop_boxes(sizes: Tensor, num_patches: int) -> Tensor:
    """``num_patches`` random crop boxes per image inside its valid extent: (B, M, 4) XYXY pixels.

    ``sizes`` is (B, 2) valid (height, width). Images narrower than 2 * MIN_PIXEL get crops of
    at least one pixel.
    """
    heights = sizes[:, 0, None].expand(-1, num_patches).float()
    widths = sizes[:, 1, None].expand(-1, num_patches).float()
    boxes = []
    for side in (widths, heights):
        low = side.clamp(max=MIN_PIXEL).clamp(min=1)
        length = _uniform_int(low, torch.maximum(side - MIN_PIXEL, low))
        start = _uniform_int(torch.zeros_like(side), side - length)
        boxes.append((start, start + length))
    (x0, x1), (y0, y1) = boxes
    return torch.stack([x0, y0, x1, y1], -1)


def crop_patches(images: Tensor, boxes: Tensor, size: int = PATCH_SIZE) -> Tensor:
    """Cut (B, M, 4) XYXY pixel boxes out of (B, 3, H, W) images, each resized to ``size`` x ``size``:
    (B * M, 3, size, size), image-major."""
    rois = list(boxes.to(images.dtype).unbind(0))
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def augment_patches(patches: Tensor) -> Tensor:
    """Each normalised crop colour-jittered, greyed and blurred with its own random draw."""
    augmented = torch.stack([_QUERY_AUGMENT(patch) for patch in denormalize(patches)])
    return normalize(augmented).to(patches.dtype)


def crop_targets(boxes: Tensor, sizes: Tensor) -> list[dict[str, Tensor]]:
    """Detection targets of the crops: boxes as normalised cxcywh of the valid image, label PATCH_LABEL."""
    scale = sizes.flip(1).repeat(1, 2)[:, None].to(boxes.dtype)  # (B, 1, 4) = w, h, w, h
    normalised = box_convert(boxes / scale, "xyxy", "cxcywh")
    labels = torch.full(boxes.shape[:2], PATCH_LABEL, dtype=torch.int64, device=boxes.device)
    return [{"boxes": b, "labels": label} for b, label in zip(normalised, labels)]


def group_attention_mask(num_queries: int, num_groups: int, device: torch.device | str | None = None) -> Tensor:
    """(Q, Q) bool mask for decoder self-attention, True (blocked) between queries of different groups.

    Queries form ``num_groups`` consecutive groups of ``num_queries // num_groups``, one per crop.
    """
    if num_queries % num_groups:
        raise ValueError(f"{num_queries} queries cannot form {num_groups} equal groups (one per query patch)")
    group = torch.arange(num_queries, device=device) // (num_queries // num_groups)
    return group[:, None] != group[None, :]


def _to_uint8(images: Tensor) -> Tensor:
    return (denormalize(images) * 255).to(torch.uint8)


@torch.no_grad()
def draw_patch_localisation(images: Tensor, sizes: Tensor, targets: list[dict[str, Tensor]], scores: Tensor,
                            pred_boxes: Tensor, num_images: int = 2) -> Tensor:
    """TensorBoard pictures of the pretext task: each image with its crop boxes (green) and, per
    crop, the box of the most confident query of its group (red), both numbered by crop.

    ``scores`` (B, Q) is each query's object probability, ``pred_boxes`` (B, Q, 4) normalised
    cxcywh. Returns (n, 3, H, W) floats in [0, 1].
    """
    pictures = []
    uint8 = _to_uint8(images[:num_images].float())
    for image, size, target, score, boxes in zip(uint8, sizes, targets, scores, pred_boxes):
        num_patches = len(target["boxes"])
        per_group = score.shape[0] // num_patches
        best = score.view(num_patches, per_group).argmax(1) + torch.arange(num_patches, device=score.device) * per_group
        scale = size.flip(0).repeat(2).to(boxes.dtype)
        true_boxes = box_convert(target["boxes"].float(), "cxcywh", "xyxy") * scale
        found = box_convert(boxes[best].float(), "cxcywh", "xyxy") * scale
        names = [str(i + 1) for i in range(num_patches)]
        picture = draw_bounding_boxes(image.cpu(), true_boxes.cpu(), labels=names, colors="lime", width=2)
        picture = draw_bounding_boxes(picture, found.cpu(), labels=names, colors="red", width=2)
        pictures.append(picture)
    return torch.stack(pictures).float() / 255


@torch.no_grad()
def draw_patches(patches: Tensor, num_images: int, num_patches: int) -> Tensor:
    """The crops fed as queries (after augmentation) of the first ``num_images`` images, in [0, 1]."""
    return _to_uint8(patches[:num_images * num_patches].float()).float() / 255
