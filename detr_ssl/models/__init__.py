"""Model factory: ``build_model(args) -> (model, criterion, postprocessors)``."""
from __future__ import annotations

from torch import nn

from ..ops import set_default_backend
from ..ssl import build_pretext_task
from ..ssl.levels import LevelHeads
from ..ssl.updetr import PATCH_NUM_CLASSES

from .backbone import build_backbone
from .criterion import SetCriterion, detection_weight_dict, query_patch_weight_dict
from .deformable_detr import DeformableDETR, level_strides
from .deformable_transformer import build_deformable_transformer
from .detr import DETR
from .matcher import HungarianMatcher, build_matcher
from .position_encoding import build_position_encoding
from .postprocess import PostProcess, PostProcessSigmoid
from .query_patches import QueryPatchOptions
from .transformer import build_transformer

COCO_NUM_CLASSES = 91  # largest COCO category id + 1, as the official code


def query_patch_options(args) -> QueryPatchOptions | None:
    """UP-DETR settings of the model, None without ``--query_patches``."""
    if not args.query_patches:
        return None
    return QueryPatchOptions(num_patches=args.num_patches, feature_recon=args.feature_recon,
                             query_shuffle=args.query_shuffle, own_class_head=args.ssl_mode != "pretrain")


def patch_criterion(args, matcher: HungarianMatcher) -> SetCriterion | None:
    """The set losses of the query patches (object vs no-object, boxes, features), or None."""
    if not args.query_patches:
        return None
    losses = ("labels", "boxes", "cardinality") + (("feature",) if args.feature_recon else ())
    classification = {"focal_alpha": args.focal_alpha} if args.model == "deformable_detr" else {"eos_coef": args.eos_coef}
    return SetCriterion(PATCH_NUM_CLASSES, matcher, query_patch_weight_dict(args), losses=losses, **classification)


def build_model(args) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Build the detector named by ``--model`` with its criterion and post-processors.

    ``args.num_classes`` is the classifier size (largest category id + 1); ``None`` means COCO's 91.
    UP-DETR pre-training (``--query_patches --ssl_mode pretrain``) has 2 classes, object and
    background, as the official model, whose checkpoints then load strictly.
    """
    num_classes = args.num_classes or COCO_NUM_CLASSES
    if args.query_patches and args.ssl_mode == "pretrain":
        num_classes = PATCH_NUM_CLASSES
    matcher, weight_dict = build_matcher(args), detection_weight_dict(args)
    ssl = {"ssl_mode": args.ssl_mode, "query_patches": query_patch_options(args),
           "ssl_backbone_grad": args.ssl_backbone_grad}
    if args.model == "detr":
        backbone = build_backbone(args, build_position_encoding(args))
        ssl["ssl_head"] = build_pretext_task(args.ssl_task, args.hidden_dim, backbone.strides[-1], args.ssl_ratio,
                                             args.tokenizer)
        model = DETR(backbone, build_transformer(args), num_classes=num_classes, num_queries=args.num_queries,
                     aux_loss=args.aux_loss, **ssl)
        criterion = SetCriterion(num_classes, matcher, weight_dict, eos_coef=args.eos_coef, ssl_task=ssl["ssl_head"],
                                 patch_criterion=patch_criterion(args, matcher))
        return model, criterion, {"bbox": PostProcess()}
    if args.model == "deformable_detr":
        set_default_backend(args.msda_backend)
        stages = ("layer2", "layer3", "layer4") if args.num_feature_levels > 1 else ("layer4",)
        backbone = build_backbone(args, build_position_encoding(args), return_stages=stages)
        ssl["ssl_head"] = build_pretext_task(args.ssl_task, args.hidden_dim, backbone.strides[0], args.ssl_ratio,
                                             args.tokenizer)
        if args.ssl_levels:
            ssl["ssl_head"].level_heads = LevelHeads(args.hidden_dim,
                                                     level_strides(backbone.strides, args.num_feature_levels)[1:])
        model = DeformableDETR(backbone, build_deformable_transformer(args), num_classes=num_classes,
                               num_queries=args.num_queries, num_feature_levels=args.num_feature_levels,
                               aux_loss=args.aux_loss, with_box_refine=args.with_box_refine, two_stage=args.two_stage,
                               **ssl)
        criterion = SetCriterion(num_classes, matcher, weight_dict, focal_alpha=args.focal_alpha,
                                 ssl_task=ssl["ssl_head"], patch_criterion=patch_criterion(args, matcher))
        return model, criterion, {"bbox": PostProcessSigmoid(num_select=args.max_dets)}
    raise ValueError(f"--model: unknown model {args.model!r}")
