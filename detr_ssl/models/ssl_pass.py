"""The self-supervised pass on the encoder, shared by DETR and Deformable DETR.

With a pretext task, the model corrupts its own input (``task.corrupt``), encodes it, and lets
the task's head predict from the encoder tokens of the SSL level, returning ``ssl_outputs``
next to the detection outputs (multi-task) or alone (pre-training). A whole-detector method
runs the clean pass its own way. The criterion turns the outputs into losses, so the engine
trains every task and method the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.misc import NestedTensor, as_nested_tensor

SIZE_DIVISIBILITY = 32  # the deepest backbone stride: padding to it makes every level's token grid exact


def pad_to_multiple(samples: NestedTensor, multiple: int) -> NestedTensor:
    """Pad the batch bottom-right so that its height and width are multiples of ``multiple``."""
    height, width = samples.tensors.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == pad_w == 0:
        return samples
    return NestedTensor(F.pad(samples.tensors, (0, pad_w, 0, pad_h)),
                        F.pad(samples.mask, (0, pad_w, 0, pad_h), value=True))


class SelfSupervisedMixin:
    """``forward`` for detectors that implement ``run(samples, decode, extra, backbone_grad, features)
    -> DetectorPass`` (:mod:`detr_ssl.models.passes`), whose ``levels`` list the (B, h, w, C)
    encoder tokens and position embeddings of each level, the first being the one whose stride is
    the pretext task's patch size (the others feed ``--ssl_levels``).

    ``ssl_head`` (the encoder pretext task, or None), ``ssl_mode`` ('pretrain' or 'multitask'),
    ``ssl_backbone_grad`` and ``ssl_method`` (a whole-detector pre-training method from
    :mod:`detr_ssl.methods`, which attaches itself, or None) are set at construction. The clean
    pass is the method's (it decides what the decoder does) or, without one, plain detection
    (not in pre-training); a task that corrupts its input gets a second, encoder-only pass,
    whose backbone runs without gradients when the pretext loss must not train it
    (``ssl_backbone_grad=False``). In evaluation a multi-task model only detects.

    The second pass is not batched with the clean one: on a CPU one call on the doubled batch
    made the DETR step 3-5 % faster but the Deformable DETR step 10-23 % slower (its large
    stride-8 tensors; docs/benchmarks.md), and with ``--backbone_norm batch`` it would mix the
    two batches' statistics.
    """

    ssl_head: nn.Module | None
    ssl_mode: str
    ssl_backbone_grad: bool
    ssl_method = None  # set by DetectorMethod.attach

    def _init_ssl(self, ssl_head: nn.Module | None, ssl_mode: str, ssl_backbone_grad: bool) -> None:
        """Set the pretext-task attributes (the detector's constructor calls this)."""
        if ssl_mode not in ("pretrain", "multitask"):
            raise ValueError(f"ssl_mode must be 'pretrain' or 'multitask', got {ssl_mode!r}")
        if not ssl_backbone_grad and ssl_head is not None and not ssl_head.corrupts_input and ssl_mode == "multitask":
            raise ValueError(f"ssl_backbone_grad=False cannot apply to {ssl_head.name} next to detection: the task "
                             "reads the clean pass's encoder tokens, whose backbone trains")
        self.ssl_head = ssl_head
        self.ssl_mode = ssl_mode
        self.ssl_backbone_grad = ssl_backbone_grad

    def forward(self, samples: NestedTensor | list[Tensor]) -> dict:
        """``samples``: a NestedTensor or a list of CHW images; returns the official output dict
        (plus ``ssl_outputs`` with a pretext task and the method's outputs with a method; only
        those in pre-training)."""
        samples = as_nested_tensor(samples)
        task, method, pretrain = self.ssl_head, self.ssl_method, self.ssl_mode == "pretrain"
        if (task is None and method is None) or not (pretrain or self.training):
            return self.run(samples).outputs
        if task is not None:
            samples = pad_to_multiple(samples, self.ssl_size_divisibility())
            corrupted, targets = task.corrupt(samples.tensors, ~samples.mask)
        clean = None
        if method is not None:
            clean = method.forward(self, samples, detect=not pretrain)
        elif not pretrain:
            clean = self.run(samples)
        outputs = {} if clean is None else clean.outputs
        if task is None:
            return outputs
        if clean is None or task.corrupts_input:
            levels = self.run(NestedTensor(corrupted, samples.mask), decode=False,
                              backbone_grad=self.ssl_backbone_grad).levels
        else:
            levels = clean.levels
        outputs["ssl_outputs"] = {
            "prediction": task.predict(*levels[0], targets),
            "targets": targets,
            "images": samples.tensors,
            "corrupted": corrupted,
            "valid": ~samples.mask,
        }
        if task.level_heads is not None:
            outputs["ssl_outputs"]["level_predictions"] = task.level_heads([tokens for tokens, _ in levels[1:]])
        return outputs

    def ssl_size_divisibility(self) -> int:
        """Pad to the deepest backbone stride, and to the coarsest level's with ``--ssl_levels``,
        so that every token grid the task reads covers the padded image exactly."""
        if self.ssl_head.level_heads is None:
            return SIZE_DIVISIBILITY
        return max(SIZE_DIVISIBILITY, *self.ssl_head.level_heads.strides)

    @torch.no_grad()
    def pictures(self, outputs: dict, targets: list[dict]) -> list[tuple[str, Tensor, int]]:
        """TensorBoard pictures of the pretext outputs (and the batch's ``targets``, which a method may
        draw): ``(tag, (N, 3, H, W) images in [0, 1], rows)``."""
        pictures = []
        if "ssl_outputs" in outputs:
            ssl = outputs["ssl_outputs"]
            grid = self.ssl_head.visualize(ssl["images"], ssl["corrupted"], ssl["prediction"], ssl["targets"],
                                           ssl["valid"])
            pictures.append((f"ssl/{self.ssl_head.name}", grid, 4))
        if self.ssl_method is not None:
            pictures.extend(self.ssl_method.pictures(outputs, targets))
        return pictures

    def after_optimizer_step(self) -> None:
        """Called by the engine after every optimizer step (a method's momentum copy follows it)."""
        if self.ssl_method is not None:
            self.ssl_method.after_optimizer_step(self)
