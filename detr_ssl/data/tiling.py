"""Sliding windows over large images, and merging the detections of overlapping windows.

Aerial images (iSAID, DOTA) are several thousand pixels on a side, far more than a detector
trained on 800 px patches sees at once. ``scripts/prepare_isaid.py`` cuts training patches and
``scripts/predict.py`` cuts inference windows with the same grid, so a model meets objects at
the scale it was trained on; the detections of the windows are then shifted back to the full
image and merged.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_area

# A box edge this close (in pixels) to an edge of its window that lies inside the image is taken
# as cut by that edge: the object may go on in the neighbouring window.
BORDER_MARGIN = 4.0


class Window(NamedTuple):
    """A window of an image: its pixels are x0 <= x < x1, y0 <= y < y1."""

    x0: int
    y0: int
    x1: int
    y1: int


def window_origins(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of the windows along one axis.

    The stride is ``size - overlap``; the last window is shifted inwards to end at ``length``
    (never padded), and an axis no longer than ``size`` gets one window at 0.
    """
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"need window size > 0 and 0 <= overlap < size, got size={size}, overlap={overlap}")
    if length <= size:
        return [0]
    return [*range(0, length - size, size - overlap), length - size]


def sliding_windows(width: int, height: int, size: int, overlap: int) -> list[Window]:
    """All windows of a ``width`` x ``height`` image, row by row; together they cover every pixel."""
    return [
        Window(x0, y0, x0 + min(size, width), y0 + min(size, height))
        for y0 in window_origins(height, size, overlap)
        for x0 in window_origins(width, size, overlap)
    ]


def cut_by_window(boxes: Tensor, window: Window, width: int, height: int, margin: float = BORDER_MARGIN) -> Tensor:
    """Which full-image XYXY ``boxes`` of ``window`` reach one of its edges that lies inside the
    ``width`` x ``height`` image, i.e. may be a cut-off view of an object a neighbour sees whole."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return (((x1 <= window.x0 + margin) & (window.x0 > 0))
            | ((y1 <= window.y0 + margin) & (window.y0 > 0))
            | ((x2 >= window.x1 - margin) & (window.x1 < width))
            | ((y2 >= window.y1 - margin) & (window.y1 < height)))


def _coverage(inner: Tensor, outer: Tensor) -> Tensor:
    """(N, M) fraction of each ``inner`` box's area that lies inside each ``outer`` box."""
    top_left = torch.maximum(inner[:, None, :2], outer[None, :, :2])
    bottom_right = torch.minimum(inner[:, None, 2:], outer[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(-1)
    return intersection / box_area(inner).clamp(min=1e-6)[:, None]


def merge_window_detections(detections: list[dict[str, Tensor]], windows: list[Window], width: int, height: int,
                            iou_threshold: float = 0.5, cover_threshold: float = 0.7,
                            margin: float = BORDER_MARGIN) -> dict[str, Tensor]:
    """One image's detections from the detections of its windows.

    ``detections[i]`` holds ``boxes`` (XYXY, in the pixels of ``windows[i]``), ``scores`` and
    ``labels``. Boxes are shifted to full-image coordinates; with several windows, duplicates
    are merged per class:

    1. class-wise NMS (``torchvision.ops.batched_nms`` at ``iou_threshold``) in which boxes cut
       by an inner window edge rank below every uncut box, so that the whole view of an object
       wins over a cut-off one whatever their scores;
    2. a cut box that lies at least ``cover_threshold`` inside a kept uncut box of its class is
       dropped: it is the part of that object the other window saw whole (its IoU with the
       whole box is only the fraction it shows, often under ``iou_threshold``).

    An object larger than the overlap is cut in every window that holds it and can come out in
    pieces: choose an overlap larger than the objects. One window is returned as it is (the
    detector's own set of boxes, as in evaluation). Results are sorted by score.
    """
    if len(detections) != len(windows):
        raise ValueError(f"{len(detections)} detection sets for {len(windows)} windows")
    if not windows:
        raise ValueError("no windows to merge")
    shifted, cut = [], []
    for detection, window in zip(detections, windows):
        offset = detection["boxes"].new_tensor([window.x0, window.y0, window.x0, window.y0])
        boxes = detection["boxes"] + offset
        shifted.append(boxes)
        cut.append(cut_by_window(boxes, window, width, height, margin))
    boxes = torch.cat(shifted)
    scores = torch.cat([d["scores"] for d in detections])
    labels = torch.cat([d["labels"] for d in detections])
    if len(windows) > 1 and len(boxes):
        is_cut = torch.cat(cut)
        # Only the order of the NMS scores matters: scores lie in [0, 1], so -2 puts every cut box last.
        rank = scores - 2.0 * is_cut.to(scores.dtype)
        keep = batched_nms(boxes.float(), rank.float(), labels, iou_threshold)
        boxes, scores, labels, is_cut = boxes[keep], scores[keep], labels[keep], is_cut[keep]
        whole = ~is_cut
        if is_cut.any() and whole.any():
            covered = _coverage(boxes[is_cut], boxes[whole]) >= cover_threshold
            covered &= labels[is_cut][:, None] == labels[whole][None, :]
            drop = torch.zeros_like(is_cut)
            drop[is_cut] = covered.any(1)
            boxes, scores, labels = boxes[~drop], scores[~drop], labels[~drop]
    order = scores.argsort(descending=True)
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}
