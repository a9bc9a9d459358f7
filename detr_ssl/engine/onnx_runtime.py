"""Prediction with an ONNX graph of ``scripts/export_onnx.py`` under onnxruntime, no checkpoint needed.

Everything prediction takes from a checkpoint travels in the file as ONNX metadata (the JSON
entry :data:`METADATA_KEY` of ``metadata_props``): the model kind, the evaluation sizes, the
category names, whether the graph is raw or post-processed, and its fixed batch and image size
(None where the axis is dynamic). onnxruntime is an optional extra, imported here only when a
graph is opened, so that the core never needs it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from detr_ssl.models.postprocess import PostProcess, PostProcessSigmoid, per_image
from detr_ssl.utils.errors import ConfigError, MissingFileError, UserError

METADATA_KEY = "detr_ssl"


def import_onnxruntime() -> ModuleType:
    """onnxruntime, or an error saying how to install it: it is an optional extra."""
    try:
        import onnxruntime
    except ImportError as err:
        raise UserError(f"ONNX prediction needs onnxruntime ({err}): pip install -e '.[export]'") from err
    return onnxruntime


@dataclass(frozen=True)
class GraphInfo:
    """What ``export_onnx.py`` writes into the graph's metadata: the checkpoint's ``model``,
    ``min_size``, ``max_size``, ``num_classes``, ``num_queries``, ``num_select`` (Deformable DETR's
    detections per image) and ``categories``; ``raw`` outputs; ``batch`` and ``size`` (H, W) of the
    inputs, None where that axis is dynamic."""

    model: str
    min_size: int
    max_size: int
    num_classes: int
    num_queries: int
    num_select: int
    categories: dict[int, str]
    raw: bool
    batch: int | None
    size: tuple[int, int] | None

    def to_json(self) -> str:
        return json.dumps({**vars(self), "categories": {str(k): v for k, v in self.categories.items()}})

    @classmethod
    def from_json(cls, text: str) -> GraphInfo:
        values: dict[str, Any] = json.loads(text)
        return cls(**{**values, "categories": {int(k): v for k, v in values["categories"].items()},
                      "size": tuple(values["size"]) if values["size"] else None})


class OnnxDetect:
    """:data:`detr_ssl.engine.predict.Detect` with an exported graph on onnxruntime's CPU provider.

    A fixed-size graph gets each input padded bottom-right into its size and the batch filled up
    to its batch with blank images, whose outputs are dropped; a dynamic one gets the batch padded
    to its largest input, as PyTorch does. Raw graphs are post-processed here as in evaluation.
    """

    def __init__(self, path: str | Path) -> None:
        onnxruntime = import_onnxruntime()
        if not Path(path).is_file():
            raise MissingFileError(f"--onnx {path}: no such file")
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise ConfigError(f"--onnx {path}: no '{METADATA_KEY}' metadata; export the checkpoint with "
                              "scripts/export_onnx.py, which writes what prediction needs into the file")
        self.info = GraphInfo.from_json(metadata[METADATA_KEY])
        self.postprocess = (None if not self.info.raw else PostProcess() if self.info.model == "detr"
                            else PostProcessSigmoid(self.info.num_select))

    def __call__(self, inputs: list[Tensor], sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        step = self.info.batch or len(inputs)
        found: list[dict[str, Tensor]] = []
        for start in range(0, len(inputs), step):
            found += self._run(inputs[start:start + step], sizes[start:start + step])
        return found

    def _run(self, inputs: list[Tensor], sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """One run of the graph on at most its batch of inputs."""
        images, mask = self.padded(inputs)
        target_sizes = torch.tensor(sizes + [tuple(images.shape[2:])] * (len(images) - len(inputs)))
        feeds = {"images": images.numpy(), "mask": mask.numpy()}
        if not self.info.raw:
            feeds["sizes"] = target_sizes.numpy()
        outputs = [torch.from_numpy(array) for array in self.session.run(None, feeds)]
        if self.info.raw:
            outputs = self.postprocess.batched({"pred_logits": outputs[0], "pred_boxes": outputs[1]}, target_sizes)
        return per_image(*outputs)[:len(inputs)]

    def padded(self, inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(images, mask) of ``inputs`` padded into the graph's size and batch, or an error saying
        which export fits them."""
        height, width = self.info.size or (max(t.shape[1] for t in inputs), max(t.shape[2] for t in inputs))
        for tensor in inputs:
            if tensor.shape[1] > height or tensor.shape[2] > width:
                raise ConfigError(
                    f"--onnx {self.path}: a window prepared to {tensor.shape[1]}x{tensor.shape[2]} px does not fit the "
                    f"graph's fixed input of {height}x{width}; export again with scripts/export_onnx.py --size "
                    f"{self.info.max_size} {self.info.max_size} (the checkpoint's --max_size, which fits every window)")
        return pad_inputs(inputs, (height, width), self.info.batch or len(inputs))


def pad_inputs(inputs: list[Tensor], size: tuple[int, int], batch: int) -> tuple[Tensor, Tensor]:
    """``images`` (batch, 3, H, W) and ``mask`` (batch, H, W), True on padding, of CHW ``inputs``
    that fit in ``size``, padded bottom-right as in evaluation; the batch is filled up with blank
    images, mask all False (a fully masked image would give NaNs in attention)."""
    images = torch.zeros(batch, 3, *size)
    mask = torch.zeros(batch, *size, dtype=torch.bool)
    for index, tensor in enumerate(inputs):
        images[index, :, :tensor.shape[1], :tensor.shape[2]] = tensor
        mask[index, tensor.shape[1]:], mask[index, :, tensor.shape[2]:] = True, True
    return images, mask
