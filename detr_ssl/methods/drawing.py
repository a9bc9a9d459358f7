"""TensorBoard pictures shared by the pseudo-box methods: each view with its pseudo-boxes and the
predictions matched to them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from ..utils.image import denormalize

PICTURE_GAP = 8  # white pixels between pictures side by side


def proposal_ids(target: dict) -> Tensor:
    """Each pseudo-box's index in its image's proposal list. Held-out images without
    ``--val_proposals`` have no boxes and no ids."""
    if "proposal_ids" in target:
        return target["proposal_ids"]
    return torch.arange(len(target["boxes"]), device=target["boxes"].device)


def draw_view(image: Tensor, target: dict, pred_boxes: Tensor, match: tuple[Tensor, Tensor]) -> Tensor:
    """One image (or view) cropped to its valid size, as uint8: its pseudo-boxes (green) and the
    predictions matched to them (red), both labelled with the proposal id (the same in both views)."""
    height, width = target["size"].tolist()
    picture = (denormalize(image[:, :height, :width].cpu()) * 255).to(torch.uint8)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    ids = proposal_ids(target).cpu()
    queries, matched = match
    pseudo = box_convert(target["boxes"].float().cpu(), "cxcywh", "xyxy") * scale
    found = box_convert(pred_boxes.float().cpu()[queries], "cxcywh", "xyxy") * scale
    for boxes, names, colour in ((pseudo, ids, "lime"), (found, ids[matched], "red")):
        if len(boxes):
            picture = draw_bounding_boxes(picture, boxes, labels=[str(i) for i in names.tolist()], colors=colour,
                                          width=2)
    return picture


def beside(pictures: list[Tensor], gap: int = PICTURE_GAP) -> Tensor:
    """uint8 (3, h, w) pictures in a row, top-aligned on white."""
    height = max(picture.shape[1] for picture in pictures)
    padded = [F.pad(picture, (0, gap, 0, height - picture.shape[1]), value=255) for picture in pictures]
    return torch.cat(padded, dim=2)[:, :, :-gap]


