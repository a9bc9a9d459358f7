"""A Python API over a trained checkpoint: ``Detector.from_checkpoint(path).predict(images)``, or
over its ONNX export: ``Detector.from_onnx(path)`` (onnxruntime, no torch model).

It is the inference of ``scripts/predict.py`` (:mod:`detr_ssl.engine.predict`) without files to
write: the same checkpoint loading, evaluation transforms, post-processing and, with
``tile=True``, the same sliding windows, so that both give the same detections.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from detr_ssl.data.tiling import Window, merge_window_detections
from detr_ssl.engine.predict import Detect, SlidingWindowPredictor, TorchDetect, category_names, load_detector
from detr_ssl.utils.errors import DataError, MissingFileError
from detr_ssl.utils.logging import LOGGER_NAME

ImageInput = str | Path | Image.Image | np.ndarray | Tensor


@dataclass
class Detections:
    """The detections of one image, best first: ``boxes`` (N, 4) XYXY pixels of the original
    image, ``scores`` (N,), ``labels`` (N,) class indices and ``names`` their class names."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.scores)


def to_pil(image: ImageInput) -> Image.Image:
    """An RGB PIL image of any accepted input. Arrays and tensors become 8-bit pixels first, as a
    file would give, because the evaluation transforms resize 8-bit images: every input kind of
    the same picture then yields the same detections."""
    if isinstance(image, (str, Path)):
        return _open(Path(image))
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"a numpy image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
        return Image.fromarray(image, "RGB")
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise DataError(f"a tensor image must be a 3xHxW float tensor in [0, 1], got shape "
                            f"{tuple(image.shape)} dtype {image.dtype}")
        pixels = (image.detach().cpu().float() * 255).round().clamp(0, 255).to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
    raise TypeError(f"cannot detect in a {type(image).__name__}: give a file path, a PIL image, an HxWx3 uint8 "
                    "numpy array or a 3xHxW float tensor in [0, 1]")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise MissingFileError(f"image {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


class Detector:
    """A trained detector on images of any size; build it with :meth:`from_checkpoint` or
    :meth:`from_onnx`. ``detect`` runs prepared inputs (PyTorch or onnxruntime), ``min_size`` /
    ``max_size`` are the evaluation sizes the inputs are prepared at."""

    def __init__(self, detect: Detect, min_size: int, max_size: int, names: dict[int, str],
                 device: torch.device, batch_size: int = 4) -> None:
        self.detect, self.min_size, self.max_size = detect, min_size, max_size
        self.names, self.device, self.batch_size = names, device, batch_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", batch_size: int = 4) -> Detector:
        """The detector a checkpoint of a detection run holds, in eval mode on ``device``; class
        names from the categories it saved (see ``category_names``). ``batch_size`` images (or
        windows with ``tile=True``) go through the model at once."""
        if not Path(path).is_file():
            raise MissingFileError(f"checkpoint {path}: no such file")
        model, postprocess, args, saved = load_detector(path, device, logging.getLogger(LOGGER_NAME))
        return cls(TorchDetect(model, postprocess), args.min_size, args.max_size, category_names(args, saved=saved),
                   next(model.parameters()).device, batch_size)

    @classmethod
    def from_onnx(cls, path: str | Path, batch_size: int = 4) -> Detector:
        """The detector of a graph written by ``scripts/export_onnx.py``, on onnxruntime's CPU
        provider (``pip install -e '.[export]'``): sizes and class names come from the graph's
        metadata; a fixed-size graph gets each input padded into its size."""
        from detr_ssl.engine.onnx_runtime import OnnxDetect  # onnxruntime is an optional extra

        detect = OnnxDetect(path)
        info = detect.info
        return cls(detect, info.min_size, info.max_size, info.categories, torch.device("cpu"), batch_size)

    def predict(self, images: ImageInput | Sequence[ImageInput], score_threshold: float = 0.0, tile: bool = False,
                window: int = 800, overlap: int = 200, nms_iou: float = 0.5) -> Detections | list[Detections]:
        """Detections of one image (a ``Detections``) or of a list (a list of them). With ``tile``,
        each image goes through ``window`` px sliding windows overlapping by ``overlap``, merged
        with class-wise NMS at ``nms_iou``, as ``scripts/predict.py`` does for large images;
        without, each image is run whole, at the checkpoint's ``--min_size``/``--max_size``."""
        single = not isinstance(images, (list, tuple))
        pictures = [to_pil(image) for image in ([images] if single else images)]
        predictor = SlidingWindowPredictor(self.detect, self.min_size, self.max_size, window if tile else 0, overlap,
                                           self.batch_size, score_threshold, nms_iou)
        found = [predictor(picture) for picture in pictures] if tile else self._whole(predictor, pictures)
        results = [self._named(detections) for detections in found]
        return results[0] if single else results

    @torch.no_grad()
    def _whole(self, predictor: SlidingWindowPredictor, pictures: list[Image.Image]) -> list[dict[str, Tensor]]:
        """Each picture whole, batched with those of the same size after the transforms: padding a
        batch to its largest image would change the backbone's features at the padded borders and
        so the detections, which must not depend on the company an image keeps."""
        inputs = [predictor.prepare(picture) for picture in pictures]
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, tensor in enumerate(inputs):
            by_size[tuple(tensor.shape)].append(index)
        found: dict[int, dict[str, Tensor]] = {}
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                found.update(zip(chunk, self._forward(predictor, [inputs[i] for i in chunk],
                                                      [pictures[i] for i in chunk])))
        return [found[index] for index in range(len(pictures))]

    def _forward(self, predictor: SlidingWindowPredictor, inputs: list[Tensor],
                 pictures: list[Image.Image]) -> list[dict[str, Tensor]]:
        """Detections of same-sized prepared ``inputs`` of ``pictures``, kept and ordered as
        ``SlidingWindowPredictor`` keeps those of a one-window image."""
        found = predictor.detect(inputs, [(p.height, p.width) for p in pictures])
        return [merge_window_detections([detections], [Window(0, 0, p.width, p.height)], p.width, p.height)
                for detections, p in zip(found, pictures)]

    def _named(self, detections: dict[str, Tensor]) -> Detections:
        names = [self.names.get(label, str(label)) for label in detections["labels"].tolist()]
        return Detections(detections["boxes"], detections["scores"], detections["labels"], names)
