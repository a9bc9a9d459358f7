#!/usr/bin/env python
"""Compare detr_ssl with the official DETR / Deformable DETR / UP-DETR code, number by number.

    python scripts/compare_official.py --official_repo ~/src/detr --model detr
    python scripts/compare_official.py --official_repo ~/src/Deformable-DETR --model deformable_detr \
        --variant two_stage
    python scripts/compare_official.py --official_repo ~/src/up-detr --model updetr \
        -- --pre_norm --feature_recon --fre_cnn

The official checkout (facebookresearch/detr, fundamentalvision/Deformable-DETR or dddzg/up-detr)
is imported from PATH, never copied; one repository per run, because all three have top-level
packages named ``models`` and ``util``. Its ``main.py`` parser gives the official defaults; the
same flags (``--variant``, and whatever follows ``--``) go to its parser and to ours. The official
model gets perturbed weights (zero-initialised layers then count) and frozen-BatchNorm statistics
measured on the batch (a random backbone without them makes activations blow up); its state dict
is copied into ours with ``strict=True`` (and ours back into it). Both run in float64 on the CPU,
with dropout 0, on real photos and their real boxes:

- eval mode: every output tensor and the post-processed detections;
- train mode: the matcher's indices, every loss term, the weighted total, and the gradient of
  every parameter.

It prints a JSON report and exits 1 when any check is over the tolerance. A few run-time shims
make the 2020 official code import on a current PyTorch / torchvision without editing the
checkout; ``docs/equivalence.md`` lists each with its reason.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.append(str(REPO_ROOT))

from detr_ssl.config import parse_args  # noqa: E402
from detr_ssl.models import build_model  # noqa: E402

MODELS = ("detr", "deformable_detr", "updetr")
VARIANTS = {"default": [], "box_refine": ["--with_box_refine"], "two_stage": ["--with_box_refine", "--two_stage"]}
OFFICIAL_PACKAGES = ("models", "util", "datasets", "engine")
DEFAULT_DATA = REPO_ROOT / "data" / "sample"  # the coco8 photos, with a COCO json
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_feature", "gt_feature")


# --------------------------------------------------------------------------------------------
# Inputs: real photos and their boxes
# --------------------------------------------------------------------------------------------

def yolo_category_ids(root: Path) -> dict[int, int] | None:
    """YOLO class index -> COCO category id, from the class names of the data set's YAML file
    (``scripts/yolo_to_coco.py`` knows the COCO ids); None when the names are not COCO's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from yolo_to_coco import COCO_CATEGORY_IDS
    finally:
        sys.path.pop(0)
    for file in sorted(root.glob("*.yaml")):
        names = (yaml.safe_load(file.read_text()) or {}).get("names")
        if isinstance(names, dict) and all(name in COCO_CATEGORY_IDS for name in names.values()):
            return {int(index): COCO_CATEGORY_IDS[name] for index, name in names.items()}
    return None


def read_annotations(root: Path, split: str) -> list[tuple[Path, list[int], list[list[float]]]]:
    """(image file, labels, normalised cxcywh boxes) of every image of ``split``.

    Reads the COCO-json layout (``ROOT/SPLIT/`` + ``ROOT/annotations/instances_SPLIT.json``)
    or the YOLO layout (``ROOT/images/SPLIT/``, ``ROOT/labels/SPLIT/*.txt``, e.g. coco8).
    """
    coco_json = root / "annotations" / f"instances_{split}.json"
    if coco_json.is_file():
        data = json.loads(coco_json.read_text())
        per_image: dict[int, tuple[list[int], list[list[float]]]] = {im["id"]: ([], []) for im in data["images"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
        for ann in data["annotations"]:
            (x, y, w, h), (width, height) = ann["bbox"], sizes[ann["image_id"]]
            per_image[ann["image_id"]][0].append(ann["category_id"])
            per_image[ann["image_id"]][1].append([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height])
        return [(root / split / im["file_name"], *per_image[im["id"]]) for im in data["images"]]
    label_dir = root / "labels" / split
    if label_dir.is_dir():
        ids = yolo_category_ids(root) or {}
        items = []
        for image in sorted((root / "images" / split).iterdir()):
            label_file = label_dir / f"{image.stem}.txt"
            lines = label_file.read_text().splitlines() if label_file.is_file() else []  # no file: no objects
            rows = [line.split() for line in lines if line.strip()]
            labels = [ids.get(int(r[0]), int(r[0]) + 1) for r in rows]
            items.append((image, labels, [[float(v) for v in r[1:5]] for r in rows]))
        return items
    raise SystemExit(f"--data {root}: neither {coco_json} nor {label_dir} exists")


def load_batch(root: Path, split: str, num_images: int, max_size: int | None) -> tuple[list[Tensor], list[dict]]:
    """The first ``num_images`` images with boxes, as normalised float64 CHW tensors (longer side
    at most ``max_size``), and their targets (``labels``, ``boxes`` as normalised cxcywh)."""
    items = [item for item in read_annotations(root, split) if item[1]][:num_images]
    if not items:
        raise SystemExit(f"--data {root}: no annotated images in split {split!r}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
    images, targets = [], []
    for file, labels, boxes in items:
        with Image.open(file) as pil:
            rgb = torch.frombuffer(bytearray(pil.convert("RGB").tobytes()), dtype=torch.uint8)
            image = rgb.view(pil.height, pil.width, 3).permute(2, 0, 1).to(torch.float64) / 255
        if max_size and max(image.shape[1:]) > max_size:
            scale = max_size / max(image.shape[1:])
            size = [round(image.shape[1] * scale), round(image.shape[2] * scale)]
            image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        images.append((image - mean) / std)
        targets.append({"labels": torch.tensor(labels, dtype=torch.int64),
                        "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)})
    return images, targets


# --------------------------------------------------------------------------------------------
# The official code: import from the user's checkout, with run-time shims
# --------------------------------------------------------------------------------------------

SHIMS: list[str] = []  # what was patched in this run (also in the report)


@contextlib.contextmanager
def torchvision_version_for_import(version: str = "0.99.0") -> Iterator[None]:
    """The official ``util/misc.py`` reads ``float(torchvision.__version__[:3])`` (Deformable DETR,
    UP-DETR) or ``version.parse`` (DETR) at import time to pick a workaround for torchvision < 0.7:
    '0.29' reads as 0.2 and the import then fails on names torchvision removed long ago. Report a
    version above 0.7 while the official modules load, then restore the real one."""
    import torchvision

    real = torchvision.__version__
    torchvision.__version__ = version
    try:
        yield
    finally:
        torchvision.__version__ = real


def stub_msda_extension() -> None:
    """Deformable DETR's ``models/ops/functions/ms_deform_attn_func.py`` imports its compiled CUDA
    extension ``MultiScaleDeformableAttention`` at load time; register an empty stand-in module
    (any call into it raises), so that the package imports without being built."""
    if "MultiScaleDeformableAttention" in sys.modules:
        return
    stub = types.ModuleType("MultiScaleDeformableAttention")

    def unavailable(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("the official CUDA op is not built; compare_official.py uses ms_deform_attn_core_pytorch")

    stub.ms_deform_attn_forward = stub.ms_deform_attn_backward = unavailable
    sys.modules["MultiScaleDeformableAttention"] = stub


def use_official_pytorch_msda() -> None:
    """Make the official ``MSDeformAttn`` call the official ``ms_deform_attn_core_pytorch``
    (grid_sample; autograd gives its backward) instead of the CUDA ``MSDeformAttnFunction``."""
    functions = importlib.import_module("models.ops.functions.ms_deform_attn_func")
    module = importlib.import_module("models.ops.modules.ms_deform_attn")
    core = functions.ms_deform_attn_core_pytorch

    class PytorchMSDeformAttnFunction:
        """``MSDeformAttnFunction.apply``'s signature over the PyTorch path (which ignores the
        level start index and ``im2col_step``)."""

        @staticmethod
        def apply(value: Tensor, shapes: Tensor, _level_start_index: Tensor, locations: Tensor, weights: Tensor,
                  _im2col_step: int) -> Tensor:
            return core(value, shapes, locations, weights)

    module.MSDeformAttnFunction = PytorchMSDeformAttnFunction
    SHIMS.append("models.ops.modules.ms_deform_attn.MSDeformAttnFunction -> official ms_deform_attn_core_pytorch")


def check_no_collisions(repo: Path) -> None:
    """Refuse to run when a module named like an official package is already imported from
    elsewhere (a second official repo, or another project's ``models``)."""
    for name in OFFICIAL_PACKAGES:
        module = sys.modules.get(name)
        where = Path(getattr(module, "__file__", "") or "").resolve()
        if module is not None and repo not in where.parents:
            raise SystemExit(f"module {name!r} is already imported from {where}: run one official repo per process")


def import_official(repo: Path, model: str) -> types.SimpleNamespace:
    """Import the official ``main.py`` (its argument parser) and ``models`` from ``repo``."""
    repo = repo.resolve()
    if not (repo / "main.py").is_file() or not (repo / "models").is_dir():
        raise SystemExit(f"--official_repo {repo}: expected an official checkout (main.py, models/)")
    check_no_collisions(repo)
    sys.dont_write_bytecode = True  # leave the checkout as it is: no __pycache__ in it
    sys.path.insert(0, str(repo))
    if model == "deformable_detr":
        stub_msda_extension()
        SHIMS.append("sys.modules['MultiScaleDeformableAttention'] = stub (CUDA extension not built)")
    with torchvision_version_for_import():
        SHIMS.append("torchvision.__version__ = '0.99.0' while the official modules import (util/misc.py checks)")
        spec = importlib.util.spec_from_file_location("official_main", repo / "main.py")
        main = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(main)
        models = importlib.import_module("models")
        backbone = importlib.import_module("models.backbone")
    if model == "deformable_detr":
        use_official_pytorch_msda()
    if hasattr(backbone, "is_main_process"):
        backbone.is_main_process = lambda: False  # `pretrained=is_main_process()`: no ImageNet download
        SHIMS.append("models.backbone.is_main_process -> False (no ImageNet download; weights are replaced)")
    return types.SimpleNamespace(main=main, models=models, repo=repo)


@contextlib.contextmanager
def no_weight_downloads() -> Iterator[None]:
    """Official UP-DETR's ResNet-50 downloads SwAV weights while it is built
    (``torch.hub.load_state_dict_from_url``, then ``load_state_dict(strict=False)``): give it an
    empty state dict instead; every weight is replaced before the comparison anyway."""
    real = torch.hub.load_state_dict_from_url

    def empty(url: str, *_args: Any, **_kwargs: Any) -> dict:
        SHIMS.append(f"torch.hub.load_state_dict_from_url({url}) -> {{}} while the official model is built")
        return {}

    torch.hub.load_state_dict_from_url = empty
    try:
        yield
    finally:
        torch.hub.load_state_dict_from_url = real


def official_commit(repo: Path) -> str | None:
    """``git rev-parse HEAD`` of the checkout, or None outside git."""
    try:
        result = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


# --------------------------------------------------------------------------------------------
# Building both models with the same flags
# --------------------------------------------------------------------------------------------

@dataclass
class Side:
    """One implementation: model, criterion, the bbox post-processor, and how to call them.

    ``query_patches``: UP-DETR pre-training, whose outputs and losses are read from the
    ``patch_outputs`` of our model (loss names ``loss_patch_*``) and whose official model takes
    the crops as a second argument.
    """

    name: str
    model: nn.Module
    criterion: nn.Module
    postprocess: nn.Module | None
    query_patches: bool = False
    official: bool = False


def common_argv(model: str, variant: str, extra: list[str]) -> list[str]:
    """Flags both parsers take: the variant, dropout 0 (train mode is then deterministic), CPU."""
    if variant != "default" and model != "deformable_detr":
        raise SystemExit(f"--variant {variant} is a Deformable DETR option")
    return [*VARIANTS[variant], "--dropout", "0.0", "--device", "cpu", *extra]


def our_argv(model: str, variant: str, extra: list[str], msda_backend: str) -> list[str]:
    """Our flags for the official configuration (random backbone: the weights are copied in)."""
    argv = ["--backbone_weights", "none", *common_argv(model, variant, extra)]
    if model == "updetr":
        return ["--model", "detr", "--ssl_task", "updetr", "--ssl_mode", "pretrain", *argv]
    if model == "deformable_detr":
        argv += ["--msda_backend", msda_backend]
    return ["--model", model, *argv]


def build_ours(argv: list[str]) -> Side:
    """Our model, criterion and post-processor from our flags."""
    args = parse_args(argv)
    model, criterion, post = build_model(args)
    return Side("ours", model, criterion, post.get("bbox"), query_patches=args.query_patches)


def build_official(official: types.SimpleNamespace, model: str, argv: list[str]) -> Side:
    """The official model, criterion and post-processor from the official parser and flags,
    set up as its ``main()`` does before ``build_model`` (UP-DETR: ImageNet mode, backbone lr)."""
    parser = argparse.ArgumentParser(parents=[official.main.get_args_parser()])
    args = parser.parse_args(argv)
    if model == "updetr":
        args.dataset_file, args.masks = "ImageNet", None
        args.lr_backbone = 0 if args.fre_cnn else args.lr
    with no_weight_downloads():
        net, criterion, post = official.models.build_model(args)
    return Side("official", net, criterion, None if model == "updetr" else post.get("bbox"),
                query_patches=model == "updetr", official=True)


# --------------------------------------------------------------------------------------------
# Weights: exercise every layer, then copy into the other model
# --------------------------------------------------------------------------------------------

def frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The (unfolded) FrozenBatchNorm2d modules of a model, official or torchvision."""
    return [m for m in model.modules() if type(m).__name__ == "FrozenBatchNorm2d" and hasattr(m, "running_var")]


@torch.no_grad()
def calibrate_frozen_batchnorm(model: nn.Module, batch: Tensor) -> int:
    """Set every frozen BatchNorm's statistics to those of its input on ``batch`` (one pass, layer
    after layer), as trained statistics would be; returns how many were set."""
    norms = frozen_batchnorms(model)

    def measure(module: nn.Module, inputs: tuple[Tensor]) -> None:
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))

    handles = [m.register_forward_pre_hook(measure) for m in norms]
    try:
        model.backbone[0].body(batch)
    finally:
        for handle in handles:
            handle.remove()
    return len(norms)


@torch.no_grad()
def prepare_weights(model: nn.Module, batch: Tensor, seed: int, scale: float = 0.01) -> None:
    """Perturb every parameter (and the frozen BatchNorm affine maps) by Gaussian noise of std
    ``scale`` relative to 1, so that zero-initialised layers are exercised, then calibrate the
    frozen BatchNorm statistics on ``batch``."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype), alpha=scale)
    for norm in frozen_batchnorms(model):
        norm.weight.mul_(1 + 10 * scale * torch.randn(norm.weight.shape, generator=generator, dtype=norm.weight.dtype))
        norm.bias.add_(torch.randn(norm.bias.shape, generator=generator, dtype=norm.bias.dtype), alpha=10 * scale)
    calibrate_frozen_batchnorm(model, batch)


def to_float64(model: nn.Module) -> None:
    """``model.double()``, and also the floating tensors kept as plain attributes, which
    ``.double()`` does not see (official UP-DETR's query-group attention mask, 0 / -inf)."""
    model.double()
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                setattr(module, name, value.double())
                SHIMS.append(f"{type(module).__name__}.{name} (a plain tensor attribute) cast to float64")


def copy_weights(reference: Side, ours: Side) -> None:
    """Cast both to float64 and load the reference's state dict into ours (and back), strictly."""
    to_float64(reference.model)
    ours.model.double()
    ours.criterion.double()
    reference.criterion.double()
    ours.model.load_state_dict(reference.model.state_dict(), strict=True)
    reference.model.load_state_dict(ours.model.state_dict(), strict=True)


def pad_batch(images: list[Tensor]) -> Tensor:
    """Images padded bottom-right with zeros to the largest height and width."""
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    return torch.stack([F.pad(i, (0, width - i.shape[2], 0, height - i.shape[1])) for i in images])


# --------------------------------------------------------------------------------------------
# Running both
# --------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What one forward (and backward) of one side produced."""

    outputs: dict[str, Tensor] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    total: Tensor | None = None
    indices: list[list[tuple[Tensor, Tensor]]] = field(default_factory=list)
    gradients: dict[str, Tensor | None] = field(default_factory=dict)
    detections: dict[str, Tensor] = field(default_factory=dict)


def output_tensors(outputs: dict, prefix: str = "") -> dict[str, Tensor]:
    """The official output tensors by flat name: ``pred_logits``, ``aux_outputs.0.pred_boxes``,
    ``enc_outputs.pred_logits``... (our extra keys, e.g. the crops for TensorBoard, are left out)."""
    flat = {f"{prefix}{k}": outputs[k] for k in OUTPUT_KEYS if isinstance(outputs.get(k), Tensor)}
    for i, layer in enumerate(outputs.get("aux_outputs", [])):
        flat.update(output_tensors(layer, f"{prefix}aux_outputs.{i}."))
    if "enc_outputs" in outputs:
        flat.update(output_tensors(outputs["enc_outputs"], f"{prefix}enc_outputs."))
    return flat


class PatchRecorder:
    """Records the query patches our model draws, for the official UP-DETR model to get the same."""

    def __init__(self, model: nn.Module):
        self.method, self.last = model.ssl_method, None
        self.original = self.method.make_patch_queries

    def __enter__(self) -> PatchRecorder:
        def record(detector: nn.Module, samples: Any) -> Any:
            self.last = self.original(detector, samples)
            return self.last

        self.method.make_patch_queries = record
        return self

    def __exit__(self, *_exc: Any) -> None:
        del self.method.make_patch_queries  # back to the class method


@contextlib.contextmanager
def no_patch_dropping(side: Side) -> Iterator[None]:
    """UP-DETR training drops 10 % of the query slots' patch features at random, drawn with
    differently shaped ``torch.rand`` calls in the two codes; turn it off in both for the
    value-by-value check (its rate is tested by distribution in tests/test_updetr.py)."""
    if not side.query_patches:
        yield
        return
    if side.official:
        old, side.model.mask_ratio = side.model.mask_ratio, 0.0
        try:
            yield
        finally:
            side.model.mask_ratio = old
        return
    module = importlib.import_module("detr_ssl.ssl.updetr")
    old, module.PATCH_DROP_RATIO = module.PATCH_DROP_RATIO, 0.0
    try:
        yield
    finally:
        module.PATCH_DROP_RATIO = old


def call_model(side: Side, images: list[Tensor], patches: Any) -> tuple[dict, dict, Any]:
    """One forward. Returns what the criterion takes, the outputs in the official layout (ours
    keep the UP-DETR ones under ``patch_outputs``) and the query patches drawn (ours) or used
    (official)."""
    if not side.query_patches:
        outputs = side.model(images)
        return outputs, outputs, None
    if side.official:
        crops = patches.patches.unflatten(0, (len(images), -1))  # (B, M, 3, S, S), as the official loader gives
        outputs = side.model(images, crops)
        return outputs, outputs, patches
    with PatchRecorder(side.model) as recorder:
        outputs = side.model(images)
    return outputs, outputs["patch_outputs"], recorder.last


def official_losses(side: Side, losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """The loss dict under the official names (ours: ``loss_patch_ce_0`` -> ``loss_ce_0``,
    ``patch_class_error`` -> ``class_error``)."""
    if not side.query_patches or side.official:
        return dict(losses)
    renamed = {}
    for key, value in losses.items():
        if key.startswith("loss_patch_"):
            renamed["loss_" + key[len("loss_patch_"):]] = value
        elif key.startswith("patch_"):
            renamed[key[len("patch_"):]] = value
        else:
            renamed[key] = value
    return renamed


def weighted_total(side: Side, losses: dict[str, Tensor]) -> Tensor:
    """Sum of the loss terms that ``criterion.weight_dict`` weighs, as the training loop does."""
    weights = side.criterion.weight_dict
    return sum(losses[k] * weights[k] for k in losses if k in weights)


def evaluate_side(side: Side, images: list[Tensor], seed: int, patches: Any = None) -> tuple[Run, Any]:
    """Eval mode, no gradients: the outputs and the post-processed detections."""
    side.model.eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        _, outputs, patches = call_model(side, images, patches)
        run = Run(outputs=output_tensors(outputs))
        if side.postprocess is not None:
            sizes = torch.tensor([list(i.shape[1:]) for i in images])
            for i, det in enumerate(side.postprocess(outputs, sizes)):
                run.detections.update({f"{i}.{k}": v for k, v in det.items()})
    return run, patches


def float64_targets(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Targets with float64 boxes, as a float64 model's loader would give. Our UP-DETR crop boxes
    are float32 whatever the model's dtype, which would put float32 rounding into our box losses
    (about 1e-9) and which the official matcher refuses; both criteria get these instead."""
    return [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]


def train_side(side: Side, images: list[Tensor], targets: list[dict], seed: int,
               patches: Any = None) -> tuple[Run, Any]:
    """Train mode (dropout 0): outputs, matcher indices, losses, weighted total, gradients."""
    side.model.train()
    side.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    indices: list[list[tuple[Tensor, Tensor]]] = []
    hook = side.criterion.matcher.register_forward_hook(lambda _m, _i, out: indices.append(list(out)))
    try:
        with no_patch_dropping(side):
            criterion_input, outputs, patches = call_model(side, images, patches)
        set_targets = float64_targets(patches.targets if side.query_patches else targets)
        if "patch_outputs" in criterion_input:  # our criterion reads the crop boxes from the outputs
            criterion_input["patch_outputs"]["targets"] = set_targets
        losses = side.criterion(criterion_input, set_targets)
    finally:
        hook.remove()
    total = weighted_total(side, losses)
    total.backward()
    gradients = {name: None if p.grad is None else p.grad.detach().clone()
                 for name, p in side.model.named_parameters() if p.requires_grad}
    run = Run(output_tensors(outputs), official_losses(side, losses), total.detach(), indices, gradients)
    return run, patches


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------

@dataclass
class Check:
    group: str
    name: str
    max_abs_diff: float
    scale: float  # largest |reference| value: the tolerance is relative to max(1, scale)
    flagged: bool
    note: str = ""


@dataclass
class Report:
    """All checks of one run and the tolerance they were held to."""

    tolerance: float
    checks: list[Check] = field(default_factory=list)

    def tensor(self, group: str, name: str, ours: Tensor | None, reference: Tensor | None) -> None:
        """Largest absolute difference, flagged above ``tolerance * max(1, max|reference|)``."""
        if ours is None or reference is None:
            both_none = ours is None and reference is None
            self.checks.append(Check(group, name, 0.0 if both_none else math.inf, 0.0, not both_none,
                                     "" if both_none else f"missing in {'ours' if ours is None else 'reference'}"))
            return
        if ours.shape != reference.shape:
            self.checks.append(Check(group, name, math.inf, 0.0, True,
                                     f"shape {tuple(ours.shape)} vs {tuple(reference.shape)}"))
            return
        ours, reference = ours.detach().double(), reference.detach().double()
        diff = (ours - reference).abs().max().item() if ours.numel() else 0.0
        scale = reference.abs().max().item() if reference.numel() else 0.0
        flagged = not diff <= self.tolerance * max(1.0, scale)  # NaN is flagged
        self.checks.append(Check(group, name, diff, scale, flagged))

    def tensors(self, group: str, ours: dict[str, Tensor | None], reference: dict[str, Tensor | None]) -> None:
        """Compare two dicts key by key; a key on one side only is flagged."""
        for name in sorted(set(ours) | set(reference)):
            missing = object()
            a, b = ours.get(name, missing), reference.get(name, missing)
            if a is missing or b is missing:
                self.checks.append(Check(group, name, math.inf, 0.0, True,
                                         f"only in {'reference' if a is missing else 'ours'}"))
            else:
                self.tensor(group, name, a, b)

    def indices(self, ours: list[list[tuple[Tensor, Tensor]]], reference: list[list[tuple[Tensor, Tensor]]]) -> None:
        """Matcher calls (one per decoder layer, proposals, ...) compared in order, image by image;
        the 'difference' is the number of unequal indices."""
        if len(ours) != len(reference):
            self.checks.append(Check("matching", "calls", math.inf, 0.0, True, f"{len(ours)} vs {len(reference)}"))
        for call, (images_a, images_b) in enumerate(zip(ours, reference)):
            for image, ((rows_a, cols_a), (rows_b, cols_b)) in enumerate(zip(images_a, images_b)):
                same = rows_a.shape == rows_b.shape and cols_a.shape == cols_b.shape
                wrong = (int((rows_a != rows_b).sum() + (cols_a != cols_b).sum()) if same
                         else max(len(rows_a), len(rows_b)))
                self.checks.append(Check("matching", f"call {call} image {image}", float(wrong), 0.0, wrong > 0))

    def summary(self) -> dict[str, Any]:
        groups: dict[str, dict[str, Any]] = {}
        for check in self.checks:
            group = groups.setdefault(check.group, {"checks": 0, "flagged": 0, "max_abs_diff": 0.0, "worst": None,
                                                    "reference_all_zero": 0})
            group["checks"] += 1
            group["flagged"] += check.flagged
            group["reference_all_zero"] += check.group != "matching" and check.scale == 0  # checks that test little
            if check.max_abs_diff >= group["max_abs_diff"]:
                group["max_abs_diff"], group["worst"] = check.max_abs_diff, check.name
        rule = "flag if max|ours - reference| > tolerance * max(1, max|reference|)"
        return {"tolerance": self.tolerance, "tolerance_rule": rule,
                "checks": len(self.checks), "flagged": sum(c.flagged for c in self.checks), "groups": groups,
                "flagged_items": [vars(c) for c in self.checks if c.flagged]}


def compare(reference: Side, ours: Side, images: list[Tensor], targets: list[dict], seed: int = 0,
            tolerance: float = 1e-10) -> Report:
    """Run both sides on the same batch (eval, then train with backward) and compare everything.
    The reference runs second: with query patches it gets the crops ours drew."""
    report = Report(tolerance)
    ours_eval, patches = evaluate_side(ours, images, seed)
    ref_eval, _ = evaluate_side(reference, images, seed, patches)
    report.tensors("outputs (eval)", ours_eval.outputs, ref_eval.outputs)
    if ours.postprocess is not None and reference.postprocess is not None:
        report.tensors("detections (post-processed, eval)", ours_eval.detections, ref_eval.detections)
    ours_train, patches = train_side(ours, images, targets, seed)
    ref_train, _ = train_side(reference, images, targets, seed, patches)
    report.tensors("outputs (train)", ours_train.outputs, ref_train.outputs)
    report.indices(ours_train.indices, ref_train.indices)
    report.tensors("losses", ours_train.losses, ref_train.losses)
    report.tensor("losses", "weighted total", ours_train.total, ref_train.total)
    report.tensors("gradients", ours_train.gradients, ref_train.gradients)
    return report


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_cli(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the flags after ``--`` that go to both models' parsers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Flags after -- go to both parsers, e.g. -- --enc_layers 2 --pre_norm")
    parser.add_argument("--official_repo", type=Path, required=True, help="checkout of the official repository")
    parser.add_argument("--model", choices=MODELS, default="detr")
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="default",
                        help="Deformable DETR: default, box_refine (--with_box_refine), two_stage (+ --two_stage)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="COCO-json layout (ROOT/SPLIT, ROOT/annotations) or YOLO layout (ROOT/images, "
                             "ROOT/labels)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_images", type=int, default=2, help="batch size (images of different sizes: padding)")
    parser.add_argument("--max_size", type=int, default=None, help="downscale images whose longer side exceeds this")
    parser.add_argument("--tolerance", type=float, default=1e-10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--msda_backend", default="pytorch", choices=("pytorch", "cpu"),
                        help="our deformable-attention back end (the official side always runs its PyTorch path)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json_out", type=Path, default=None, help="also write every check here")
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    cli, extra = parse_cli(argv)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    images, targets = load_batch(cli.data, cli.split, cli.num_images, cli.max_size)
    official = import_official(cli.official_repo, cli.model)
    torch.manual_seed(cli.seed)
    reference = build_official(official, cli.model, common_argv(cli.model, cli.variant, extra))
    ours = build_ours(our_argv(cli.model, cli.variant, extra, cli.msda_backend))
    to_float64(reference.model)
    prepare_weights(reference.model, pad_batch(images), cli.seed)
    copy_weights(reference, ours)
    report = compare(reference, ours, images, targets, cli.seed, cli.tolerance)
    result = {"model": cli.model, "variant": cli.variant, "extra_flags": extra,
              "official_repo": str(official.repo), "official_commit": official_commit(official.repo),
              "torch": torch.__version__, "dtype": "float64", "device": "cpu",
              "images": [list(i.shape[1:]) for i in images], "boxes": [len(t["labels"]) for t in targets],
              "shims": SHIMS, **report.summary()}
    print(json.dumps(result, indent=1, default=float))
    if cli.json_out:
        cli.json_out.write_text(json.dumps({**result, "all_checks": [vars(c) for c in report.checks]}, indent=1))
    return 1 if result["flagged"] else 0


if __name__ == "__main__":
    sys.exit(main())
