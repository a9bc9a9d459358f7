"""The self-supervised pass on the encoder, shared by DETR and Deformable DETR.

With a pretext task, the model corrupts its own input (``task.corrupt``), encodes it, and lets
the task's head predict from the encoder tokens of the SSL level, returning ``ssl_outputs``
next to the detection outputs (multi-task) or alone (pre-training). The criterion turns them
into ``loss_ssl``, so the engine trains every task the same way.
"""
from __future__ import annotations

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
    """``forward`` for detectors that implement ``run(samples, decode) -> (outputs, levels)``, where
    ``levels`` lists the (B, h, w, C) encoder tokens and position embeddings of each level, the
    first being the one whose stride is the pretext task's patch size (the others feed
    ``--ssl_levels``).

    ``ssl_head`` (the pretext task, or None) and ``ssl_mode`` ('pretrain' or 'multitask') are
    set by the model's constructor. In evaluation a multi-task model only detects.
    """

    ssl_head: nn.Module | None
    ssl_mode: str

    def forward(self, samples: NestedTensor | list[Tensor]) -> dict:
        """``samples``: a NestedTensor or a list of CHW images; returns the official output dict
        (plus ``ssl_outputs`` with a pretext task; only those in pre-training)."""
        samples = as_nested_tensor(samples)
        task = self.ssl_head
        if task is None or (self.ssl_mode == "multitask" and not self.training):
            return self.run(samples, decode=True)[0]
        samples = pad_to_multiple(samples, self.ssl_size_divisibility())
        corrupted, targets = task.corrupt(samples.tensors, ~samples.mask)
        if self.ssl_mode == "pretrain":
            outputs, levels = {}, self.run(NestedTensor(corrupted, samples.mask), decode=False)[1]
        elif not task.corrupts_input:  # one clean pass serves detection and the task
            outputs, levels = self.run(samples, decode=True)
        else:
            outputs = self.run(samples, decode=True)[0]
            levels = self.run(NestedTensor(corrupted, samples.mask), decode=False)[1]
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
