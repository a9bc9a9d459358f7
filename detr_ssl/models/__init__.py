"""Model factory: ``build_model(args) -> (model, criterion, postprocessors)``."""
from __future__ import annotations

from torch import nn

from ..ops import set_default_backend
from ..ssl import build_pretext_task
from ..ssl.levels import LevelHeads

from .backbone import build_backbone
from .criterion import SetCriterion, detection_weight_dict
from .deformable_detr import DeformableDETR, level_strides
from .deformable_transformer import build_deformable_transformer
from .detr import DETR
from .matcher import build_matcher
from .position_encoding import build_position_encoding
from .postprocess import PostProcess, PostProcessSigmoid
from .transformer import build_transformer

COCO_NUM_CLASSES = 91  # largest COCO category id + 1, as the official code


def pretext_parts(args, patch_stride: int) -> dict:
    """The encoder pretext task (``ssl_head``) and the mode settings the detector takes."""
    task = build_pretext_task(args.ssl_task, args.hidden_dim, patch_stride, args.ssl_ratio, args.tokenizer)
    return {"ssl_head": task, "ssl_mode": args.ssl_mode, "ssl_backbone_grad": args.ssl_backbone_grad}


def build_model(args) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Build the detector named by ``--model`` with its criterion and post-processors.

    ``args.num_classes`` is the classifier size (largest category id + 1); ``None`` means COCO's 91.
    A pre-training method (``--ssl_method``) attaches its modules and may fix the class count in
    pre-training (UP-DETR: 2, object and background, as the official model, whose checkpoints
    then load strictly).
    """
    from ..methods import build_method  # methods build on the models: imported here, not at the top

    method = build_method(args)
    num_classes = args.num_classes or COCO_NUM_CLASSES
    if method is not None and args.ssl_mode == "pretrain" and method.pretrain_classes is not None:
        num_classes = method.pretrain_classes
    if args.model == "detr":
        backbone = build_backbone(args, build_position_encoding(args))
        ssl = pretext_parts(args, backbone.strides[-1])
        model = DETR(backbone, build_transformer(args), num_classes=num_classes, num_queries=args.num_queries,
                     aux_loss=args.aux_loss, **ssl)
        postprocessors = {"bbox": PostProcess()}
        classification = {"eos_coef": args.eos_coef}
    elif args.model == "deformable_detr":
        set_default_backend(args.msda_backend)
        stages = ("layer2", "layer3", "layer4") if args.num_feature_levels > 1 else ("layer4",)
        backbone = build_backbone(args, build_position_encoding(args), return_stages=stages)
        ssl = pretext_parts(args, backbone.strides[0])
        if args.ssl_levels:
            ssl["ssl_head"].level_heads = LevelHeads(args.hidden_dim,
                                                     level_strides(backbone.strides, args.num_feature_levels)[1:])
        model = DeformableDETR(backbone, build_deformable_transformer(args), num_classes=num_classes,
                               num_queries=args.num_queries, num_feature_levels=args.num_feature_levels,
                               aux_loss=args.aux_loss, with_box_refine=args.with_box_refine, two_stage=args.two_stage,
                               **ssl)
        postprocessors = {"bbox": PostProcessSigmoid(num_select=args.max_dets)}
        classification = {"focal_alpha": args.focal_alpha}
    else:
        raise ValueError(f"--model: unknown model {args.model!r}")
    weight_dict, pretext_losses, matched_losses = detection_weight_dict(args), [], {}
    if ssl["ssl_head"] is not None:
        pretext_losses.append(ssl["ssl_head"].outputs_loss)
    if method is not None:
        method.attach(model)
        weight_dict.update(method.weight_dict())
        pretext_losses.append(method.loss)
        matched_losses.update(method.matched_losses())
    criterion = SetCriterion(num_classes, build_matcher(args), weight_dict, matched_losses=matched_losses,
                             pretext_losses=tuple(pretext_losses), **classification)
    return model, criterion, postprocessors
