"""Boxes drawn on images (torchvision's ``draw_bounding_boxes``) for predictions and ground truth."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

# Distinct colours for categories (category id modulo the list), readable on aerial and street scenes.
PALETTE = ("red", "dodgerblue", "yellow", "magenta", "cyan", "orange", "lime", "deeppink", "white", "gold",
           "springgreen", "violet", "tomato", "deepskyblue", "chartreuse", "hotpink", "khaki", "aquamarine")
GROUND_TRUTH_COLOUR = "lime"
PREDICTION_COLOUR = "red"


def category_colour(category_id: int) -> str:
    """The same colour for a category in every picture."""
    return PALETTE[category_id % len(PALETTE)]


def to_uint8(image: Image.Image) -> Tensor:
    """A PIL image as the (3, H, W) uint8 tensor ``draw_bounding_boxes`` draws on."""
    return TF.pil_to_tensor(image.convert("RGB"))


def draw_boxes(image: Tensor, boxes_xyxy: Tensor, texts: list[str], colours: str | list[str],
               width: int = 2) -> Tensor:
    """``image`` (uint8, 3xHxW) with each XYXY box outlined and captioned (text on a filled label)."""
    if len(boxes_xyxy) == 0:
        return image
    colours = colours if isinstance(colours, list) else [colours] * len(boxes_xyxy)
    return draw_bounding_boxes(image, boxes_xyxy.float(), labels=texts, colors=colours, width=width,
                               label_colors="black", fill_labels=True)


def caption(image: Tensor, text: str) -> Tensor:
    """``image`` with ``text`` in black on a white band in its top-left corner (a panel title)."""
    picture = TF.to_pil_image(image)
    draw = ImageDraw.Draw(picture)
    left, top, right, bottom = draw.textbbox((4, 4), text)
    draw.rectangle((0, 0, right + 4, bottom + 4), fill="white")
    draw.text((4, 4), text, fill="black")
    return TF.pil_to_tensor(picture)


def side_by_side(left: Tensor, right: Tensor, gap: int = 8) -> Tensor:
    """Two pictures of the same size next to each other, with a white gap."""
    separator = torch.full((3, left.shape[1], gap), 255, dtype=torch.uint8)
    return torch.cat([left, separator, right], dim=2)


def save_png(image: Tensor, path: str | Path) -> None:
    """Write a uint8 (3, H, W) tensor as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    TF.to_pil_image(image).save(path, format="PNG")
