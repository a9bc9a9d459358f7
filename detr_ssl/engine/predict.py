"""Inference with a trained checkpoint on images of any size (``scripts/predict.py``).

A detector trained on 800 px iSAID patches has to see full aerial images (thousands of pixels)
at the same scale: the image is cut into overlapping windows with the grid of
``prepare_isaid.py``, each window goes through the evaluation transforms and the model, and the
windows' detections are shifted back and merged (``detr_ssl.data.tiling``).
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from detr_ssl.config import MODEL_DEFAULTS, build_parser
from detr_ssl.data.coco import split_paths
from detr_ssl.data.isaid import ISAID_CATEGORIES
from detr_ssl.data.tiling import Window, merge_window_detections, sliding_windows
from detr_ssl.data.transforms import build_transforms, xyxy_boxes
from detr_ssl.engine.checkpoint import load_checkpoint, load_for_evaluation, model_state_of
from detr_ssl.models import build_model
from detr_ssl.utils.errors import ConfigError, DataError
from detr_ssl.utils.logging import LOGGER_NAME
from detr_ssl.utils.misc import nested_tensor_from_tensor_list


def _saved_args(checkpoint: dict[str, Any]) -> dict[str, Any]:
    saved = checkpoint.get("args") or {}
    return dict(vars(saved) if isinstance(saved, argparse.Namespace) else saved)


def inference_args(checkpoint: dict[str, Any], device: str) -> argparse.Namespace:
    """The configuration a checkpoint was trained with, completed with today's defaults, for
    building its detector: no weight download, no pretext task or method (their heads are dropped).

    Official DETR / Deformable DETR checkpoints save no ``model`` or ``num_classes``: they are
    read off the state dict (a level embedding means Deformable DETR; the class head's rows
    give the class count).
    """
    saved = _saved_args(checkpoint)
    state = checkpoint["model"]
    args = build_parser().parse_args([])
    vars(args).update({key: value for key, value in saved.items() if hasattr(args, key)})
    if "model" not in saved:
        args.model = "deformable_detr" if "transformer.level_embed" in state else "detr"
    if saved.get("num_classes") is None:
        head = next((v for k, v in state.items() if k in ("class_embed.weight", "class_embed.0.weight")), None)
        if head is not None:
            args.num_classes = head.shape[0] - (1 if args.model == "detr" else 0)
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device, args.backbone_weights, args.pretrain, args.resume = device, "none", "", ""
    args.ssl_task, args.ssl_levels, args.tokenizer = "none", False, None
    args.ssl_method, args.query_patches = "none", False
    return args


@contextmanager
def _weights_come_later() -> Iterator[None]:
    """Silence the backbone's warning about random weights with frozen BatchNorm: it is about
    training, and here the checkpoint's weights replace the random ones at once."""
    def not_about_random_weights(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("random backbone weights")

    logger = logging.getLogger(LOGGER_NAME)
    logger.addFilter(not_about_random_weights)
    try:
        yield
    finally:
        logger.removeFilter(not_about_random_weights)


def load_detector(path: str | Path, device: str, logger: logging.Logger) -> tuple[nn.Module, nn.Module,
                                                                                  argparse.Namespace, dict[int, str]]:
    """(model in eval mode on ``device``, its box post-processor, its configuration, the category
    names it saved (empty for checkpoints without them)) from a checkpoint file; the weights must
    match the model exactly (``ssl_head.*`` aside)."""
    checkpoint = load_checkpoint(path)
    checkpoint = {**checkpoint, "model": model_state_of(checkpoint, path)}
    if _saved_args(checkpoint).get("ssl_mode") == "pretrain":
        raise ConfigError(f"{path} is a pre-training checkpoint (--ssl_mode pretrain): its decoder and heads never "
                         "learnt to detect. Fine-tune it first (main.py --pretrain CKPT ...) and predict with that")
    args = inference_args(checkpoint, device)
    with _weights_come_later():
        model, _, postprocessors = build_model(args)
    load_for_evaluation(model, checkpoint, path, logger,
                        hint="; the configuration saved in it (args) does not build the model its weights come from")
    saved_names = {int(k): str(v) for k, v in (checkpoint.get("categories") or {}).items()}
    return model.to(device).eval(), postprocessors["bbox"], args, saved_names


def category_names(args: argparse.Namespace, coco_json: str | Path | None = None,
                   saved: dict[int, str] | None = None) -> dict[int, str]:
    """Names of the class indices: from ``coco_json``'s categories if given, else those the
    checkpoint ``saved``, else iSAID's for an iSAID checkpoint, else the training annotations the
    checkpoint names, if they are still there; empty when none of these is known."""
    if coco_json is None and saved:
        return dict(saved)
    if coco_json is None and args.dataset_file == "isaid":
        return dict(ISAID_CATEGORIES)
    if coco_json is None and args.data_path and args.dataset_file != "folder":
        try:
            coco_json = split_paths(args.data_path, args.train_split)[1]
        except FileNotFoundError:
            return {}
    return {} if coco_json is None else coco_categories(coco_json)


def coco_categories(coco_json: str | Path) -> dict[int, str]:
    """The category names of a COCO json, by id."""
    try:
        categories = json.loads(Path(coco_json).read_text()).get("categories", [])
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise DataError(f"{coco_json}: cannot read the categories of this COCO json: {err}") from err
    return {int(cat["id"]): str(cat["name"]) for cat in categories}


Detect = Callable[[list[Tensor], list[tuple[int, int]]], list[dict[str, Tensor]]]
"""A detector on one batch: prepared CHW inputs and their crops' (height, width) -> one dict of
``boxes`` (XYXY pixels of those sizes), ``scores`` and ``labels`` per input, on the CPU."""


class TorchDetect:
    """:data:`Detect` with a PyTorch model and its post-processor: the batch padded bottom-right
    to its largest input, as in evaluation."""

    def __init__(self, model: nn.Module, postprocess: nn.Module) -> None:
        self.model, self.postprocess = model, postprocess

    @torch.no_grad()
    def __call__(self, inputs: list[Tensor], sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        device = next(self.model.parameters()).device
        batch = nested_tensor_from_tensor_list(inputs).to(device)
        found = self.postprocess(self.model(batch), torch.tensor(sizes, device=device))
        return [{key: value.cpu() for key, value in image.items()} for image in found]


class SlidingWindowPredictor:
    """Detections on a whole image: windows of ``window`` px overlapping by ``overlap`` (one
    window of the whole image with ``window`` <= 0 or a small image), each prepared exactly as
    in evaluation (resized to the checkpoint's ``min_size``/``max_size``, normalised), run through
    ``detect`` (a PyTorch model, :class:`TorchDetect`, or an ONNX graph,
    ``detr_ssl.engine.onnx_runtime.OnnxDetect``: the window logic is the same for both) in batches
    of ``batch_size``; detections under ``score_threshold`` are dropped, boxes clipped to their
    window, and the windows merged with class-wise NMS at ``nms_iou`` (see
    ``merge_window_detections``)."""

    def __init__(self, detect: Detect, min_size: int, max_size: int, window: int = 800, overlap: int = 200,
                 batch_size: int = 4, score_threshold: float = 0.0, nms_iou: float = 0.5) -> None:
        if window > 0 and not 0 <= overlap < window:
            raise ValueError(f"need 0 <= overlap < window, got window={window}, overlap={overlap}")
        self.detect_batch = detect
        self.transforms = build_transforms("val", min_size, max_size)
        self.window, self.overlap, self.batch_size = window, overlap, batch_size
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.below_threshold = 0  # detections dropped under score_threshold so far, to report

    def windows(self, width: int, height: int) -> list[Window]:
        if self.window <= 0:
            return [Window(0, 0, width, height)]
        return sliding_windows(width, height, self.window, self.overlap)

    def prepare(self, crop: Image.Image) -> Tensor:
        """A window (or a whole image) as the model takes it: resized and normalised as in evaluation."""
        empty = {"boxes": xyxy_boxes(torch.zeros(0, 4), crop.height, crop.width),
                 "labels": torch.zeros(0, dtype=torch.int64), "iscrowd": torch.zeros(0, dtype=torch.int64)}
        return self.transforms(crop, empty)[0]

    def detect(self, inputs: list[Tensor], sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections of prepared ``inputs`` (one batch) in pixels of their crops' (height, width)
        ``sizes``: under ``score_threshold`` dropped (and counted), boxes clipped, on the CPU."""
        results = []
        for found, size in zip(self.detect_batch(inputs, sizes), sizes):
            keep = found["scores"] >= self.score_threshold
            self.below_threshold += int((~keep).sum())
            found = {key: value[keep] for key, value in found.items()}
            found["boxes"] = clip_boxes_to_image(found["boxes"], size)
            results.append(found)
        return results

    def __call__(self, image: Image.Image) -> dict[str, Tensor]:
        """``boxes`` (XYXY pixels of ``image``), ``scores`` and ``labels``, best first, on the CPU."""
        image = image.convert("RGB")
        windows = self.windows(image.width, image.height)
        detections = []
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            detections.extend(self.detect([self.prepare(image.crop(w)) for w in chunk],
                                          [(w.y1 - w.y0, w.x1 - w.x0) for w in chunk]))
        return merge_window_detections(detections, windows, image.width, image.height, self.nms_iou)
