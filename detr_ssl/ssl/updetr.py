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

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torchvision.ops import box_convert, roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
from torchvision.utils import draw_bounding_boxes

from detr_ssl.utils.image import denormalize, normalize

PATCH_SIZE = 128  # crops are resized to this square, as the official query transform
MIN_PIXEL = 8  # smallest crop side and margin, in pixels of the valid image (official min_pixel)
PATCH_DROP_RATIO = 0.1  # training drops this fraction of the query slots' patch features (official mask_ratio)
PATCH_LABEL = 1  # class of every crop; the classifier has 2 classes + no-object, as the official model
PATCH_NUM_CLASSES = 2

# SimCLR-style colour augmentation of the crops (official get_query_transforms('train')); no flip.
# The torchvision transforms hold the parameters, and QUERY_AUGMENT is the per-crop pipeline that
# ``augment_patches`` reproduces for all crops at once (the tests and the benchmark run it as the reference).
JITTER, JITTER_P = v2.ColorJitter(0.4, 0.4, 0.4, 0.1), 0.8
GREYSCALE = v2.RandomGrayscale(p=0.2)
BLUR, BLUR_P = v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0)), 0.5
QUERY_AUGMENT = v2.Compose([v2.RandomApply([JITTER], p=JITTER_P), GREYSCALE, v2.RandomApply([BLUR], p=BLUR_P)])


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


@dataclass
class CropAugmentation:
    """One random draw of QUERY_AUGMENT per crop; every field has the crops on its first dimension.

    jitter, grey, blur: (N,) bool, whether ColorJitter, RandomGrayscale, GaussianBlur apply.
    order: (N, 4) the order in which ColorJitter applies brightness (0), contrast (1), saturation (2)
        and hue (3); it draws a new order for every call.
    brightness, contrast, saturation, hue, sigma: (N,) the factors and the blur's sigma (drawn
        for every crop; used where their transform applies).
    """

    jitter: Tensor
    order: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    grey: Tensor
    blur: Tensor
    sigma: Tensor

    @classmethod
    def sample(cls, num_crops: int, device: torch.device | str | None = None) -> CropAugmentation:
        """Independent draws per crop from the distributions torchvision's transforms draw from
        (``uniform_`` over their ranges, ``rand < p`` for RandomApply and RandomGrayscale,
        a uniformly random order of the four jitter steps)."""
        def uniform(bounds: tuple[float, float]) -> Tensor:
            return torch.empty(num_crops, device=device).uniform_(*bounds)

        def coin(p: float) -> Tensor:
            return torch.rand(num_crops, device=device) < p

        return cls(jitter=coin(JITTER_P), order=torch.rand(num_crops, 4, device=device).argsort(1),
                   brightness=uniform(JITTER.brightness), contrast=uniform(JITTER.contrast),
                   saturation=uniform(JITTER.saturation), hue=uniform(JITTER.hue), grey=coin(GREYSCALE.p),
                   blur=coin(BLUR_P), sigma=uniform(BLUR.sigma))


def _transform_rows_(pixels: Tensor, rows: Tensor, transform: Callable[..., Tensor], *factors: Tensor) -> Tensor:
    """``transform(crops, *their factors)`` written in place into the crops where ``rows`` holds:
    most transforms apply to a fraction of the crops, so they run only there (one host sync for
    the index)."""
    index = rows.nonzero().squeeze(1)
    if len(index):
        pixels[index] = transform(pixels[index], *(factor[index] for factor in factors))
    return pixels


def _adjust_hue(pixels: Tensor, hue: Tensor) -> Tensor:
    """``TF.adjust_hue`` with one factor per crop (it takes one per call): its HSV round trip, with
    torchvision's own converters (private, but they work on batches), the hue shifted per crop."""
    h, s, v = _rgb_to_hsv(pixels).unbind(1)
    return _hsv_to_rgb(torch.stack([h.add_(hue[:, None, None]).remainder_(1.0), s, v], 1))


def _gaussian_blur(pixels: Tensor, sigma: Tensor) -> Tensor:
    """``TF.gaussian_blur`` (BLUR's kernel size, reflect padding) with one sigma per crop (it takes
    one per call): torchvision's kernel, softmax(-(x / sigma)^2) over the taps, built per crop, and
    every crop's channels convolved at once as groups; separably (rows, then columns), since the
    2-D kernel is the outer product of the 1-D one with itself."""
    size = BLUR.kernel_size[0]
    half = (size - 1) / (2.0 * math.sqrt(2.0))
    taps = torch.linspace(-half, half, size, dtype=pixels.dtype, device=pixels.device)
    kernel = torch.softmax(-(taps / sigma[:, None]).pow(2), dim=1).repeat_interleave(pixels.shape[1], 0)
    channels = rearrange(pixels, "n c h w -> 1 (n c) h w")
    padded = F.pad(channels, [size // 2] * 4, mode="reflect")
    rows = F.conv2d(padded, kernel[:, None, None, :], groups=len(kernel))
    return F.conv2d(rows, kernel[:, None, :, None], groups=len(kernel)).view_as(pixels)


def _color_jitter(pixels: Tensor, draw: CropAugmentation) -> Tensor:
    """ColorJitter with each crop's own factors and order (``TF.adjust_*`` take one factor per call);
    returns a new tensor.

    Brightness, contrast and saturation are each torchvision's blend clamp(f x + (1 - f) base) with
    base black, the mean grey level or the grey image, so each of the four steps is one blend of
    all crops with per-crop f and base; f = 1 leaves a crop unchanged (no jitter drawn, or its step
    is hue). Hue then runs on the crops whose step it is.
    """
    factors = torch.stack([draw.brightness, draw.contrast, draw.saturation, torch.ones_like(draw.hue)], 1)
    factors = factors.where(draw.jitter[:, None], 1.0)
    for step in draw.order.unbind(1):
        factor = factors.gather(1, step[:, None]).view(-1, 1, 1, 1)
        grey = TF.rgb_to_grayscale(pixels)
        is_contrast, is_saturation = (step.view(-1, 1, 1, 1) == code for code in (1, 2))
        base = grey.mul(is_saturation).add_(grey.mean((1, 2, 3), keepdim=True) * is_contrast)  # 0 for brightness
        pixels = pixels.mul(factor).add_(base.mul_(1 - factor)).clamp_(0, 1)
        _transform_rows_(pixels, draw.jitter & (step == 3), _adjust_hue, draw.hue)
    return pixels


def apply_augmentation(pixels: Tensor, draw: CropAugmentation) -> Tensor:
    """(N, 3, S, S) crops in [0, 1], each augmented by QUERY_AUGMENT with its own ``draw``, all at once."""
    pixels = _color_jitter(pixels, draw)  # a new tensor: the steps below write into it
    _transform_rows_(pixels, draw.grey, partial(TF.rgb_to_grayscale, num_output_channels=3))
    return _transform_rows_(pixels, draw.blur, _gaussian_blur, draw.sigma)


def augment_patches(patches: Tensor) -> Tensor:
    """Each normalised crop colour-jittered, greyed and blurred with its own random draw."""
    draw = CropAugmentation.sample(len(patches), patches.device)
    return normalize(apply_augmentation(denormalize(patches), draw)).to(patches.dtype)


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
