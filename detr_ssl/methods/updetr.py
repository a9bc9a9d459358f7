"""UP-DETR random query patch detection (Dai et al., 2021), for DETR and Deformable DETR.

Each image gives ``--num_patches`` random crops (:mod:`detr_ssl.ssl.updetr`). They pass the
backbone, are average-pooled and projected to the query width (``patch2query``), repeated so
that every crop feeds one group of ``num_queries // num_patches`` consecutive queries, and added
to the object queries' positional embeddings (``--query_shuffle`` draws which object query
serves which slot). Decoder self-attention is masked between groups. The decoded queries
predict object / no-object and a box, matched against the crop boxes; with
``--feature_recon`` they also reconstruct the crop's pooled feature (``feature_align``).

Parameter names are the official UP-DETR ones, so its checkpoints load strictly. In
pre-training the detector's own class head is the object / no-object head (2 classes, as the
official model); next to detection (multi-task) a separate ``patch_class_embed`` is.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.criterion import SetCriterion, class_loss_coef, matched_query_index, repeat_for_aux_layers
from ..models.heads import MLP, prediction_dict
from ..models.matcher import build_matcher
from ..models.passes import DetectorPass, ExtraQueries
from ..ssl import updetr as crops
from ..utils.misc import NestedTensor
from .base import DetectorMethod, Error, Picture


@dataclass
class PatchQueries:
    """One batch's query patches, ready for the decoder.

    queries: (B, Q, C) patch features per query slot, to add to the positional query embeddings.
    order: (Q,) which object query embedding each slot uses (a permutation with --query_shuffle).
    features: (B * M, C_backbone) the crops' pooled backbone features (feature-reconstruction targets).
    targets: per image, the crop boxes (normalised cxcywh) with label PATCH_LABEL.
    patches: (B * M, 3, S, S) the crops as fed to the backbone (for TensorBoard).
    sizes: (B, 2) the valid (height, width) of each image.
    images: (B, 3, H, W) the images the crops come from (for TensorBoard).
    """

    queries: Tensor
    order: Tensor
    features: Tensor
    targets: list[dict[str, Tensor]]
    patches: Tensor
    sizes: Tensor
    images: Tensor


def patch_loss_name(name: str) -> str:
    """The name of a query-patch loss: ``loss_ce_0`` -> ``loss_patch_ce_0``, ``class_error`` ->
    ``patch_class_error``."""
    return "loss_patch_" + name[len("loss_"):] if name.startswith("loss_") else "patch_" + name


def feature_reconstruction_loss(outputs: dict, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
                                num_boxes: float) -> dict[str, Tensor]:
    """Squared distance between the L2-normalised features that matched queries reconstruct and
    their crops' pooled backbone features, summed over matches and divided by the number of targets."""
    predicted = outputs["pred_feature"][matched_query_index(indices)]
    crop_features = outputs["gt_feature"].unflatten(0, (len(indices), -1))
    target = torch.cat([features[j] for features, (_, j) in zip(crop_features, indices)])
    loss = F.mse_loss(F.normalize(predicted, dim=1), F.normalize(target, dim=1), reduction="sum")
    return {"loss_feature": loss / num_boxes}


class QueryPatches(DetectorMethod):
    """UP-DETR: the decoder learns to find random crops of the image given their features as queries."""

    name = "updetr"
    modes = ("pretrain", "multitask")
    pretrain_classes = crops.PATCH_NUM_CLASSES
    module_prefixes = ("patch2query.", "feature_align.", "patch_class_embed.")
    architecture_flags = ("query_patches", "num_patches", "feature_recon")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument_group("UP-DETR random query patches (--ssl_method updetr)").add_argument
        add("--query_patches", action="store_true",
            help="same as --ssl_method updetr: random crops of each image, pooled by the backbone, join the object "
                 "queries, and the decoder learns to find them (UP-DETR); with --ssl_mode pretrain alone or next to "
                 "an --ssl_task, with multitask next to detection")
        add("--num_patches", type=int, default=10, help="query patches (crops) per image; --num_queries must be a multiple")
        add("--query_patch_loss_coef", type=float, default=1.0,
            help="weight of the query-patch losses (each also carries its detection weight); follows --ssl_loss_schedule")
        add("--feature_recon", action="store_true",
            help="matched queries also reconstruct their crop's L2-normalised backbone feature (MSE, weight 1)")
        add("--query_shuffle", action="store_true", help="draw which object query serves each patch slot, every step")
        add("--fre_cnn", action="store_true",
            help="freeze the whole backbone (sets --lr_backbone 0), as UP-DETR pre-training; without it, query-patch "
                 "pre-training trains the backbone at --lr unless --lr_backbone is given (official UP-DETR)")

    @classmethod
    def validate(cls, args: argparse.Namespace, error: Error) -> None:
        if args.num_patches < 1 or args.num_queries % args.num_patches:
            error(f"--num_queries ({args.num_queries}) must be a positive multiple of --num_patches "
                  f"({args.num_patches}): each query patch gets an equal group of queries")
        if args.query_patch_loss_coef < 0:
            error(f"--query_patch_loss_coef must be >= 0, got {args.query_patch_loss_coef}")

    @classmethod
    def configure(cls, args: argparse.Namespace, given: set[str]) -> None:
        if args.ssl_mode == "pretrain" and "lr_backbone" not in given and not args.fre_cnn:
            args.lr_backbone = args.lr  # official UP-DETR pre-training: the backbone learns at --lr

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.num_patches = args.num_patches
        self.feature_recon = args.feature_recon
        self.query_shuffle = args.query_shuffle
        self.own_class_head = args.ssl_mode != "pretrain"
        classification = {"focal_alpha": args.focal_alpha} if args.model == "deformable_detr" else {"eos_coef": args.eos_coef}
        matched = {"feature": feature_reconstruction_loss} if args.feature_recon else {}
        self.criterion = SetCriterion(crops.PATCH_NUM_CLASSES, build_matcher(args), self.weight_dict(),
                                      matched_losses=matched, **classification)

    def attach(self, detector: nn.Module) -> None:
        """``patch2query`` (and ``feature_align``, ``patch_class_embed``) on the detector, official names."""
        if self.num_patches < 1 or detector.num_queries % self.num_patches:
            raise ValueError(f"--num_queries ({detector.num_queries}) must be a multiple of --num_patches "
                             f"({self.num_patches}): every crop gets an equal group of queries")
        channels, hidden_dim = detector.backbone.num_channels[-1], detector.transformer.d_model
        detector.patch2query = nn.Linear(channels, hidden_dim)
        if self.feature_recon:
            detector.feature_align = MLP(hidden_dim, hidden_dim, channels, 2)
        if self.own_class_head:
            no_object = 0 if detector.uses_sigmoid_classes else 1
            detector.patch_class_embed = nn.Linear(hidden_dim, crops.PATCH_NUM_CLASSES + no_object)
        detector.register_buffer("patch_attn_mask",
                                 crops.group_attention_mask(detector.num_queries, self.num_patches), persistent=False)
        super().attach(detector)

    def forward(self, detector: nn.Module, samples: NestedTensor, detect: bool) -> DetectorPass:
        """One encoding; the decoder runs the query patches (and the object queries with ``detect``)."""
        patch_queries = self.make_patch_queries(detector, samples)
        extra = ExtraQueries(patch_queries.queries, patch_queries.order, detector.patch_attn_mask,
                             self.patch_class_heads(detector))
        result = detector.run(samples, decode=detect, extra=extra)
        result.outputs["patch_outputs"] = self.patch_outputs(detector, result, patch_queries)
        return result

    def crop_features(self, detector: nn.Module, patches: Tensor) -> Tensor:
        """(N, 3, S, S) crops -> (N, C) average-pooled last-stage backbone features. A frozen
        backbone runs without autograd (the crops need no gradient)."""
        body = detector.backbone[0].body
        trainable = any(p.requires_grad for p in body.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return list(body(patches).values())[-1].mean((2, 3))

    def make_patch_queries(self, detector: nn.Module, samples: NestedTensor) -> PatchQueries:
        """Draw the crops of every image and turn them into query-slot features."""
        batch, num_queries = samples.tensors.shape[0], detector.num_queries
        sizes = crops.valid_sizes(samples.mask)
        boxes = crops.sample_crop_boxes(sizes, self.num_patches)
        patches = crops.crop_patches(samples.tensors, boxes)
        if detector.training:
            patches = crops.augment_patches(patches)
        features = self.crop_features(detector, patches)
        queries = (detector.patch2query(features).view(batch, self.num_patches, -1)
                   .repeat_interleave(num_queries // self.num_patches, dim=1))
        if detector.training:  # drop some slots' patch, as dropout (official mask_ratio)
            keep = torch.rand(batch, num_queries, 1, device=queries.device) > crops.PATCH_DROP_RATIO
            queries = queries * keep.to(queries.dtype)
        shuffle = self.query_shuffle and detector.training
        order = (torch.randperm(num_queries) if shuffle else torch.arange(num_queries)).to(queries.device)
        return PatchQueries(queries, order, features, crops.crop_targets(boxes, sizes), patches, sizes,
                            samples.tensors)

    def patch_class_heads(self, detector: nn.Module) -> list[nn.Module]:
        """The object / no-object head of each decoder layer."""
        num_layers = self.args.dec_layers
        if self.own_class_head:
            return [detector.patch_class_embed] * num_layers
        return detector.layer_class_heads(num_layers)

    def patch_outputs(self, detector: nn.Module, result: DetectorPass, patch_queries: PatchQueries) -> dict:
        """The official UP-DETR output dict from the query patches' predictions, plus the crops'
        ``targets`` and what TensorBoard draws."""
        decoded = result.extra
        out = prediction_dict(decoded.logits, decoded.boxes, detector.aux_loss)
        if self.feature_recon:
            features = detector.feature_align(decoded.states)
            layers = [*out.get("aux_outputs", []), out]
            for layer, feature in zip(layers, features[len(features) - len(layers):]):
                layer.update(pred_feature=feature, gt_feature=patch_queries.features)
        logits = decoded.logits[-1]
        scores = logits.sigmoid() if detector.uses_sigmoid_classes else logits.softmax(-1)
        out.update(targets=patch_queries.targets, patches=patch_queries.patches, sizes=patch_queries.sizes,
                   images=patch_queries.images, object_scores=scores[..., 1].detach())
        return out

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """The set losses of the query patches, matched against their own crop boxes: ``loss_patch_*``."""
        if "patch_outputs" not in outputs:
            return {}
        patches = outputs["patch_outputs"]
        return {patch_loss_name(k): v for k, v in self.criterion.detection_set_losses(patches, patches["targets"]).items()}

    def weight_dict(self, scale: float = 1.0) -> dict[str, float]:
        """The detection weights (and 1 for ``--feature_recon``), times ``--query_patch_loss_coef`` and
        ``scale``, under the ``loss_patch_*`` names."""
        args = self.args
        last_layer = {"loss_ce": class_loss_coef(args), "loss_bbox": args.bbox_loss_coef,
                      "loss_giou": args.giou_loss_coef}
        if args.feature_recon:
            last_layer["loss_feature"] = 1.0
        coef = args.query_patch_loss_coef * scale
        weights = repeat_for_aux_layers(args, last_layer, proposals=False)
        return {patch_loss_name(k): v * coef for k, v in weights.items()}

    def describe(self) -> str:
        return (f"query patches ({self.args.ssl_mode}, {self.num_patches} per image) with weight "
                f"{self.args.query_patch_loss_coef:.4g}")

    def pictures(self, outputs: dict, targets: list[dict]) -> list[Picture]:
        """The crops fed as queries, and each image with its crop boxes (green) and the box its query
        group found for each crop (red)."""
        if "patch_outputs" not in outputs:
            return []
        patches = outputs["patch_outputs"]
        num_images = min(len(patches["targets"]), 2)
        num_patches = len(patches["targets"][0]["boxes"])
        boxes = crops.draw_patch_localisation(patches["images"], patches["sizes"], patches["targets"],
                                              patches["object_scores"], patches["pred_boxes"], num_images)
        return [("ssl/query_patches", crops.draw_patches(patches["patches"], num_images, num_patches), num_images),
                ("ssl/query_patch_boxes", boxes, 1)]
