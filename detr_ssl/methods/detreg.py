"""DETReg (Bar et al., CVPR 2022): pre-train the whole detector to find unsupervised pseudo-boxes.

The targets are the ``--proposals`` pseudo-boxes of each unlabelled image (selective search,
``scripts/propose_boxes.py``), which the data augmentation moves like real labels. The detector
is trained on them as on labels of one class ("object": class-agnostic objectness with the
detector's own classification loss), with its Hungarian matching and L1 + GIoU box losses; and
an object embedding head (``feature_embed``, DETReg's name: MLP with 2 layers) on the last
decoder layer regresses (L1, mean over elements, as DETReg's ``loss_object_embedding``) the
pooled feature of each matched pseudo-box in the reference backbone. DETReg takes it from a
frozen SwAV ResNet-50 run on the box's crop; here it is RoIAlign (7 x 7, averaged) on the
detector's own last backbone stage, which is the same frozen network when the backbone is
frozen (the default, as DETReg: ``--lr_backbone 0``) and whatever ``--backbone_weights`` gives.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, roi_align

from ..models.criterion import matched_query_index
from ..models.heads import MLP
from ..models.matcher import build_matcher
from ..models.passes import DetectorPass
from ..utils.misc import NestedTensor
from .base import DetectorMethod, Error, Picture
from .drawing import beside, draw_view

ROI_SIZE = 7  # RoIAlign output side before averaging


def box_features(features: Tensor, boxes: list[Tensor], sizes: list[Tensor], stride: int) -> Tensor:
    """The averaged RoIAlign features of each image's normalised cxcywh ``boxes`` (relative to its
    valid (h, w) ``size``) on (B, C, h, w) ``features`` of the given stride: (N, C), image-major."""
    rois = [box_convert(b.float(), "cxcywh", "xyxy") * size.flip(0).repeat(2).to(torch.float32)
            for b, size in zip(boxes, sizes)]
    pooled = roi_align(features.float(), rois, output_size=ROI_SIZE, spatial_scale=1.0 / stride,
                       sampling_ratio=2, aligned=True)
    return pooled.mean((2, 3))


class DETReg(DetectorMethod):
    """Find the pseudo-boxes (class-agnostic) and regress their frozen backbone features."""

    name = "detreg"
    needs_proposals = True
    pretrain_classes = 1
    module_prefixes = ("feature_embed.",)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument_group("DETReg (--ssl_method detreg)").add_argument
        add("--object_embedding_loss_coef", type=float, default=1.0,
            help="weight of DETReg's object-embedding L1 loss (the matched queries regress their pseudo-box's pooled "
                 "backbone feature)")

    @classmethod
    def validate(cls, args: argparse.Namespace, error: Error) -> None:
        if args.object_embedding_loss_coef < 0:
            error(f"--object_embedding_loss_coef must be >= 0, got {args.object_embedding_loss_coef}")
        require_proposals(cls.name, args, error)

    @classmethod
    def configure(cls, args: argparse.Namespace, given: set[str]) -> None:
        if "lr_backbone" not in given:
            args.lr_backbone = 0.0  # the backbone stays frozen (DETReg: --lr_backbone 0)

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.matcher = build_matcher(args)
        self.stride = 1

    def attach(self, detector: nn.Module) -> None:
        """``feature_embed``: decoder states -> the last backbone stage's channels."""
        hidden_dim, channels = detector.transformer.d_model, detector.backbone.num_channels[-1]
        detector.feature_embed = MLP(hidden_dim, hidden_dim, channels, 2)
        self.stride = detector.backbone.strides[-1]
        super().attach(detector)

    def forward(self, detector: nn.Module, samples: NestedTensor, detect: bool) -> DetectorPass:
        """Detect the pseudo-boxes; the last layer also predicts each query's object embedding."""
        result = detector.run(samples)
        result.outputs["pred_embedding"] = detector.feature_embed(result.decoded.states[-1])
        result.outputs["detreg_inputs"] = {"features": result.features[0][-1].tensors.detach(),
                                           "images": samples.tensors}
        return result

    def matched_losses(self) -> dict:
        return {"object_embedding": self.object_embedding_loss}

    def object_embedding_loss(self, outputs: dict, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
                              num_boxes: float) -> dict[str, Tensor]:
        """L1 (mean over elements) between the matched queries' embeddings and their pseudo-boxes'
        pooled backbone features; only the last layer has embeddings."""
        if "pred_embedding" not in outputs:
            return {}
        predicted = outputs["pred_embedding"][matched_query_index(indices)]
        with torch.no_grad():
            target = box_features(outputs["detreg_inputs"]["features"], [t["boxes"][j] for t, (_, j) in zip(targets, indices)],
                                  [t["size"] for t in targets], self.stride)
        if len(target) == 0:
            return {"loss_object_embedding": predicted.sum() * 0.0}
        return {"loss_object_embedding": F.l1_loss(predicted, target)}

    def weight_dict(self, scale: float = 1.0) -> dict[str, float]:
        return {"loss_object_embedding": self.args.object_embedding_loss_coef * scale}

    def describe(self) -> str:
        return (f"DETReg on the --proposals pseudo-boxes, object embedding weight "
                f"{self.args.object_embedding_loss_coef:.4g}")

    def pictures(self, outputs: dict, targets: list[dict]) -> list[Picture]:
        """The first two images side by side: pseudo-boxes (green) and the predictions matched to them
        (red), numbered by proposal id."""
        if "detreg_inputs" not in outputs:
            return []
        count = min(len(targets), 2)
        with torch.no_grad():
            indices = self.matcher({"pred_logits": outputs["pred_logits"][:count],
                                    "pred_boxes": outputs["pred_boxes"][:count]}, targets[:count])
        images = outputs["detreg_inputs"]["images"]
        pictures = [draw_view(images[i], targets[i], outputs["pred_boxes"][i], indices[i]) for i in range(count)]
        return [("ssl/detreg_boxes", beside(pictures)[None].float() / 255, 1)]


def require_proposals(name: str, args: argparse.Namespace, error: Error) -> None:
    """A pseudo-box method trains on unlabelled images with ``--proposals``: refuse anything else."""
    if args.dataset_file != "folder" or not getattr(args, "proposals", None):
        error(f"--ssl_method {name} learns from pseudo-boxes of unlabelled images: use --dataset_file folder "
              "--data_path DIR --proposals FILE (computed once by scripts/propose_boxes.py --images DIR)")
