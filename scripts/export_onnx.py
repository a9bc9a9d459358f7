"""Export a trained DETR or Deformable DETR checkpoint (ResNet or ViT backbone) to ONNX, and check it.

    python scripts/export_onnx.py --resume runs/coco/checkpoint.pth --out model.onnx [--opset 17]
        [--dynamic] [--raw] [--size H W] [--tolerance 1e-4]

The graph takes ``images`` (B, 3, H, W), normalised as in evaluation (resized to the
checkpoint's --min_size/--max_size, ImageNet mean and std) and padded bottom-right to H x W,
``mask`` (B, H, W) bool, True on padding, and ``sizes`` (B, 2) int64, each image's original
(height, width). It returns ``boxes`` (B, K, 4) XYXY pixels of those sizes, ``scores`` (B, K)
and ``labels`` (B, K): for DETR the best real class of each of the K queries (softmax), for
Deformable DETR the K = --num_select best (query, class) pairs (sigmoid), as in evaluation.
With --raw it takes no ``sizes`` and returns ``logits`` (B, Q, classes) and ``boxes`` (B, Q, 4),
normalised CXCYWH, the last decoder layer's.

Exporter: the TorchScript-based one (``torch.onnx.export(..., dynamo=False)``). On torch 2.14 the
dynamo-based exporter needs the extra package onnxscript, and the traced graph of these models
is exact without it. Deformable attention is exported through its PyTorch back end (grid_sample),
whatever --msda_backend the checkpoint was trained with: the compiled kernels are no ONNX ops.

--dynamic makes the batch axis (0) of every input and output dynamic, for both models, raw or
post-processed (the post-processors compute the batch at once, no per-image split), and for DETR
also the image height and width (axes 2, 3 of ``images``, 1, 2 of ``mask``: its sine position
encoding is computed from the mask in the graph) with a ResNet. Deformable DETR's level shapes and
start indices, and a ViT's window partition and position-table resampling matrices, are Python
integers and constants when traced, so they are baked into the graph and its image size is always
fixed at --size (pad smaller images into it; each image's own valid size still comes from the mask). Without --dynamic every axis is fixed at --batch x --size.

The graph carries what scripts/predict.py --onnx needs instead of the checkpoint, as the JSON
metadata entry "detr_ssl" (``detr_ssl.engine.onnx_runtime.GraphInfo``): model, --min_size,
--max_size, class count, queries, category names, raw or not, and the fixed batch and size (null
where dynamic).

The file is checked with onnx.checker and run with onnxruntime on the sample images of
data/sample/val against PyTorch (with --dynamic also at another batch size and, for DETR, at
another image size). The last stdout line is a JSON summary with the largest difference (scores, and boxes
divided by the image sizes so that it does not grow with them; raw logits and boxes as they
are); above --tolerance, or with any label differing, nothing is written and the exit code is 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
from PIL import Image
from torch import Tensor, nn

from detr_ssl.engine.onnx_runtime import METADATA_KEY, GraphInfo, pad_inputs
from detr_ssl.engine.predict import SlidingWindowPredictor, TorchDetect, category_names, load_detector
from detr_ssl.models.vit import is_vit
from detr_ssl.ops.ms_deform_attn import set_default_backend
from detr_ssl.utils.errors import ConfigError, UserError
from detr_ssl.utils.image import image_files
from detr_ssl.utils.logging import LOGGER_NAME
from detr_ssl.utils.misc import NestedTensor

SAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "data" / "sample" / "val"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", type=Path, required=True, help="checkpoint of a detection run (checkpoint.pth)")
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    parser.add_argument("--dynamic", action="store_true",
                        help="dynamic batch (both models) and image size (DETR only)")
    parser.add_argument("--raw", action="store_true", help="output the logits and normalised boxes, not detections")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="padded input size (default: --max_size of the checkpoint, square)")
    parser.add_argument("--batch", type=int, default=2,
                        help="images per batch of the graph (fixed unless --dynamic) (default: 2)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest difference from PyTorch allowed on the sample images (default: 1e-4)")
    parser.add_argument("--images", type=Path, default=SAMPLE_IMAGES,
                        help=f"folder of images to check the export on (default: {SAMPLE_IMAGES})")
    return parser


def import_onnx() -> tuple[ModuleType, ModuleType]:
    """(onnx, onnxruntime), or an error saying how to install them: they are optional extras."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise UserError(f"export_onnx.py needs onnx and onnxruntime ({err}): pip install -e '.[export]'") from err
    return onnx, onnxruntime


class ExportedDetector(nn.Module):
    """The detector and its post-processing on plain tensors, as an ONNX graph needs them."""

    def __init__(self, model: nn.Module, postprocess: nn.Module, raw: bool) -> None:
        super().__init__()
        self.model, self.postprocess, self.raw = model, postprocess, raw

    def forward(self, images: Tensor, mask: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        outputs = self.model(NestedTensor(images, mask))
        if self.raw:
            return outputs["pred_logits"], outputs["pred_boxes"]
        return self.postprocess.batched(outputs, sizes)


def input_names(raw: bool) -> list[str]:
    return ["images", "mask"] if raw else ["images", "mask", "sizes"]


def output_names(raw: bool) -> list[str]:
    return ["logits", "boxes"] if raw else ["boxes", "scores", "labels"]


def dynamic_axes(raw: bool, image_size: bool) -> dict[str, dict[int, str]]:
    """Batch axes of every input and output, and height and width of the images if ``image_size``."""
    axes = {name: {0: "batch"} for name in input_names(raw) + output_names(raw)}
    if image_size:
        axes["images"].update({2: "height", 3: "width"})
        axes["mask"].update({1: "height", 2: "width"})
    return axes


def padded_batch(pictures: list[Image.Image], prepare: SlidingWindowPredictor,
                 size: tuple[int, int] | None) -> tuple[Tensor, Tensor, Tensor]:
    """(images, mask, sizes) of ``pictures`` prepared as in evaluation, padded bottom-right to
    ``size`` (the largest of them when None)."""
    inputs = [prepare.prepare(picture) for picture in pictures]
    height = size[0] if size else max(t.shape[1] for t in inputs)
    width = size[1] if size else max(t.shape[2] for t in inputs)
    if any(t.shape[1] > height or t.shape[2] > width for t in inputs):
        raise ConfigError(f"--size {height} {width}: smaller than the prepared images "
                          f"{[tuple(t.shape[1:]) for t in inputs]}; use at least the checkpoint's --max_size")
    images, mask = pad_inputs(inputs, (height, width), len(inputs))
    sizes = torch.tensor([[p.height, p.width] for p in pictures], dtype=torch.int64)
    return images, mask, sizes


def largest_difference(ours: list, theirs: tuple[Tensor, ...], sizes: Tensor, raw: bool) -> float:
    """The largest difference between onnxruntime's outputs and PyTorch's: raw outputs as they are,
    boxes relative to the image sizes, and infinity when a label differs."""
    ours = [torch.from_numpy(array) for array in ours]
    if raw:
        return max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    if not torch.equal(ours[2], theirs[2]):
        return float("inf")
    scale = sizes.flip(1).repeat(1, 2).unsqueeze(1).to(theirs[0].dtype)
    return max(float(((ours[0] - theirs[0]) / scale).abs().max()), float((ours[1] - theirs[1]).abs().max()))


def check_batches(pictures: list[Image.Image], batch: int, size: tuple[int, int], dynamic_batch: bool,
                  image_size: bool) -> list[tuple[list[Image.Image], tuple[int, int] | None]]:
    """(pictures, padded size) of the batches to compare: the export's (the sample images repeated
    up to ``batch``), then the next image repeated, at its own size where the image size is dynamic,
    once more where the batch is."""
    cycled = [pictures[i % len(pictures)] for i in range(batch + 1)]
    batches = [(cycled[:batch], size)]
    if image_size or dynamic_batch:
        batches.append(([cycled[batch]] * (batch + int(dynamic_batch)), None if image_size else size))
    return batches


def graph_info(config: argparse.Namespace, names: dict[int, str], raw: bool, batch: int | None,
               size: tuple[int, int] | None) -> GraphInfo:
    """The metadata predict.py --onnx reads instead of the checkpoint; ``batch``/``size`` None where dynamic."""
    return GraphInfo(model=config.model, min_size=config.min_size, max_size=config.max_size,
                     num_classes=config.num_classes, num_queries=config.num_queries, num_select=config.max_dets,
                     categories=names, raw=raw, batch=batch, size=size)


def write_graph(wrapper: ExportedDetector, inputs: tuple[Tensor, ...], path: Path, opset: int,
                axes: dict[str, dict[int, str]] | None, info: GraphInfo) -> None:
    """Trace ``wrapper`` on ``inputs`` into ``path`` with the TorchScript exporter, ``axes``
    dynamic, and ``info`` as its metadata."""
    onnx, _ = import_onnx()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shapes it traces as constants, documented
        warnings.simplefilter("ignore", DeprecationWarning)  # of the TorchScript exporter, chosen above
        torch.onnx.export(wrapper, inputs, str(path), dynamo=False, opset_version=opset,
                          input_names=input_names(wrapper.raw), output_names=output_names(wrapper.raw),
                          dynamic_axes=axes)
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {METADATA_KEY: info.to_json()})
    onnx.save(graph, str(path))


def export(args: argparse.Namespace) -> dict:
    """Export, check and compare; the summary, with ``refused`` when the difference is too large."""
    onnx, onnxruntime = import_onnx()
    logger = logging.getLogger(LOGGER_NAME)
    model, postprocess, config, saved_names = load_detector(args.resume, "cpu", logger)
    set_default_backend("pytorch")  # after load_detector, which sets the checkpoint's --msda_backend
    wrapper = ExportedDetector(model, postprocess, args.raw).eval()
    image_size = args.dynamic and config.model == "detr" and not is_vit(config.backbone)
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    size = tuple(args.size) if args.size else (config.max_size, config.max_size)
    prepare = SlidingWindowPredictor(TorchDetect(model, postprocess), config.min_size, config.max_size, window=0)
    pictures = [Image.open(path).convert("RGB") for path in image_files(args.images)]
    if not pictures:
        raise ConfigError(f"--images {args.images}: no images to check the export on")
    batches = check_batches(pictures, args.batch, size, args.dynamic, image_size)
    inputs = padded_batch(batches[0][0], prepare, batches[0][1])[:len(input_names(args.raw))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    info = graph_info(config, category_names(config, saved=saved_names), args.raw,
                      None if args.dynamic else args.batch, None if image_size else size)
    checks = []
    try:
        write_graph(wrapper, inputs, partial, args.opset, dynamic_axes(args.raw, image_size) if args.dynamic else None,
                    info)
        onnx.checker.check_model(str(partial))
        session = onnxruntime.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
        for batch, padded in batches:
            tensors = padded_batch(batch, prepare, padded)[:len(input_names(args.raw))]
            with torch.no_grad():
                expected = wrapper(*tensors)
            ours = session.run(None, {name: t.numpy() for name, t in zip(input_names(args.raw), tensors)})
            checks.append({"shape": list(tensors[0].shape),
                           "max_diff": largest_difference(ours, expected, tensors[-1] if not args.raw else None,
                                                          args.raw)})
        worst = max(check["max_diff"] for check in checks)
        if worst > args.tolerance:
            partial.unlink()
        else:
            os.replace(partial, args.out)
    finally:
        partial.unlink(missing_ok=True)
    return {"out": str(args.out), "model": config.model, "raw": args.raw, "dynamic_batch": args.dynamic,
            "dynamic_size": image_size, "opset": args.opset, "exporter": "torchscript", "checks": checks,
            "max_diff": worst, "tolerance": args.tolerance, "refused": worst > args.tolerance}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = export(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if summary["refused"]:
        print(f"error: the ONNX outputs differ from PyTorch's by {summary['max_diff']:.3g} > --tolerance "
              f"{args.tolerance:g}; {args.out} not written", file=sys.stderr)
    print(json.dumps(summary))
    return 1 if summary["refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
