"""Model factory: ``build_model(args) -> (model, criterion, postprocessors)``."""
from __future__ import annotations

from torch import nn

from .backbone import build_backbone
from .criterion import SetCriterion, detection_weight_dict
from .detr import DETR
from .matcher import build_matcher
from .position_encoding import build_position_encoding
from .postprocess import PostProcess
from .transformer import build_transformer

COCO_NUM_CLASSES = 91  # largest COCO category id + 1, as the official code


def build_model(args) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Build the detector named by ``--model`` with its criterion and post-processors.

    ``args.num_classes`` is the classifier size (largest category id + 1); ``None`` means COCO's 91.
    """
    num_classes = args.num_classes or COCO_NUM_CLASSES
    if args.model != "detr":
        raise ValueError(f"--model: unknown model {args.model!r}")
    backbone = build_backbone(args, build_position_encoding(args))
    model = DETR(backbone, build_transformer(args), num_classes=num_classes, num_queries=args.num_queries,
                 aux_loss=args.aux_loss)
    criterion = SetCriterion(num_classes, build_matcher(args), detection_weight_dict(args), eos_coef=args.eos_coef)
    return model, criterion, {"bbox": PostProcess()}
