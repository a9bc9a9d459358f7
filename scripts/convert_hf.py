"""Convert DETR / Deformable DETR checkpoints to Hugging Face transformers and back, and check them.

    python scripts/convert_hf.py --to hf CKPT OUT_DIR [--tolerance 1e-4] [--images DIR] [--max_images 2]
    python scripts/convert_hf.py --from hf HF_DIR OUT.pth [--tolerance 1e-4] [--images DIR] [--max_images 2]

--to hf: CKPT (a checkpoint of ours or an official DETR / Deformable DETR one, ResNet backbone)
becomes OUT_DIR with ``config.json`` and ``model.safetensors`` (``save_pretrained``) of a
``DetrForObjectDetection`` (--model detr) or ``DeformableDetrForObjectDetection`` (--model
deformable_detr, with or without --with_box_refine and --two_stage), and a
``preprocessor_config.json`` (the checkpoint's --min_size/--max_size, ImageNet mean and std), so
``transformers.AutoModelForObjectDetection.from_pretrained(OUT_DIR)`` and the object-detection
pipeline load it. ``id2label``/``label2id`` hold the checkpoint's category names (N/A for class
indices without one). The backbone is timm's ResNet (``use_timm_backbone=True``) with
``use_pretrained_backbone=False``: nothing is downloaded, neither here nor when loading it.

--from hf: HF_DIR (a folder written by ``save_pretrained`` of one of these two classes with a
timm ResNet backbone) becomes OUT.pth in our layout, the official one: ``model`` (state dict),
``args`` (our parser's defaults plus the architecture of HF_DIR's config.json, and --min_size /
--max_size from its preprocessor_config.json if it has one) and ``categories`` (its id2label
without N/A and LABEL_i placeholders). ``main.py --eval --resume OUT.pth``,
``scripts/predict.py --resume OUT.pth`` and ``detr_ssl.Detector.from_checkpoint(OUT.pth)`` take it.

What transformers cannot express is refused: ViT backbones (--backbone vit_*), pre-norm DETR
(--pre_norm), for --from hf other backbones than timm ResNets and different encoder / decoder
widths. What it has no place for is dropped and named (a warning, and ``dropped`` in the
summary): pretext-task heads (``ssl_head.*``) and pre-training methods' modules
(``patch2query.*``, ``feature_align.*``, ``feature_embed.*``, ``contrast_*``...), and trainable
BatchNorm's ``num_batches_tracked`` counters (--backbone_norm batch; transformers freezes
BatchNorm, which evaluation does anyway: --from hf gives --backbone_norm frozen). --dilation
maps to ``dilation``. Training settings (--aux_loss, loss weights, matcher costs, learning
rates) are not converted: ``auxiliary_loss`` is written off, since transformers' DETR decoder
with it on feeds each layer the previous one's normalised output, unlike the official model.
Box refinement without two-stage has one class head per decoder layer, which transformers would
tie into one: such a config is written with ``tie_word_embeddings: false``.

Both models then run on the first --max_images images of --images (default: data/sample/val),
prepared as our evaluation does (resized to --min_size/--max_size, normalised, padded into one
batch with its mask), the HF model as reloaded from OUT_DIR, ours as loaded from OUT.pth. The
last stdout line is a JSON summary: ``max_diff``, the largest absolute differences of the last
decoder layer's logits and (normalised CXCYWH) boxes, for two-stage also of the encoder's
proposal logits and boxes on every token; above --tolerance nothing is written and the exit code
is 1. Two-stage picks its queries with a top-k of the proposal scores, where scores closer than
float rounding may come out in another order (or, at the last place, another choice): its
queries are compared proposal by proposal (the decoder treats them as a set), and
``unmatched_queries`` counts those only one model chose. ``dropped`` lists the keys not
converted, ``transformers`` the version used.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from detr_ssl.config import parse_args
from detr_ssl.engine.checkpoint import load_checkpoint, model_state_of, save_checkpoint, summarize_keys
from detr_ssl.engine.predict import SlidingWindowPredictor, TorchDetect, inference_args, load_detector
from detr_ssl.hf import (ConversionError, architecture_flags, category_names_of, differing_aliases, hf_config,
                         from_hf_state, hf_model_class, import_transformers, refuse_inexpressible, to_hf_state)
from detr_ssl.utils.errors import ConfigError, UserError
from detr_ssl.utils.image import image_files
from detr_ssl.utils.logging import LOGGER_NAME
from detr_ssl.utils.misc import NestedTensor, nested_tensor_from_tensor_list

SAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "data" / "sample" / "val"
HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
logger = logging.getLogger(LOGGER_NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=("hf",), help="convert our checkpoint SOURCE to a transformers folder")
    direction.add_argument("--from", dest="from_", choices=("hf",),
                           help="convert the transformers folder SOURCE to our checkpoint")
    parser.add_argument("source", type=Path, help="--to hf: a checkpoint (.pth); --from hf: a save_pretrained folder")
    parser.add_argument("destination", type=Path, help="--to hf: the folder to write; --from hf: the .pth to write")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest absolute difference of logits and boxes allowed (default: 1e-4)")
    parser.add_argument("--images", type=Path, default=SAMPLE_IMAGES,
                        help=f"folder of images to compare the two models on (default: {SAMPLE_IMAGES})")
    parser.add_argument("--max_images", type=int, default=2,
                        help="how many of them, in one padded batch (default: 2)")
    return parser


def sample_batch(args: argparse.Namespace, model: nn.Module, postprocess: nn.Module,
                 config_args: argparse.Namespace) -> NestedTensor:
    """The first --max_images images, prepared as in evaluation and padded into one batch."""
    prepare = SlidingWindowPredictor(TorchDetect(model, postprocess), config_args.min_size, config_args.max_size,
                                     window=0)
    paths = image_files(args.images)[:max(args.max_images, 0)]
    if not paths:
        raise ConfigError(f"--images {args.images} --max_images {args.max_images}: no images to compare the models on")
    inputs = []
    for path in paths:
        with Image.open(path) as image:
            inputs.append(prepare.prepare(image.convert("RGB")))
    return nested_tensor_from_tensor_list(inputs)


def same_proposals(ours: tuple[Tensor, Tensor, Tensor], theirs: tuple[Tensor, Tensor, Tensor]
                   ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], int]:
    """Two-stage: the (logits, boxes) of the queries that both models made of the same encoder
    tokens, in our order, and how many queries only one of them chose.

    Each model picks its queries with ``torch.topk`` of its proposal scores (the last of the
    ``(logits, boxes, proposal logits)`` given); near-ties (score gaps below float rounding) can
    order or, at the last place, choose them differently. The decoder treats its queries as a
    set, so the same proposal gives the same prediction wherever it stands."""
    count = ours[0].shape[1]
    mine, other = (torch.topk(outputs[2][..., 0], count, dim=1).indices.tolist() for outputs in (ours, theirs))
    rows_ours, rows_theirs = [], []  # (image, query) of the same proposal in either model
    for image, (tokens, their_tokens) in enumerate(zip(mine, other)):
        place = {token: query for query, token in enumerate(their_tokens)}
        for query, token in enumerate(tokens):
            if token in place:
                rows_ours.append((image, query))
                rows_theirs.append((image, place[token]))

    def pick(outputs: tuple[Tensor, Tensor, Tensor], rows: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        images, queries = torch.tensor(rows, dtype=torch.long).reshape(-1, 2).T
        return outputs[0][images, queries], outputs[1][images, queries]

    return pick(ours, rows_ours), pick(theirs, rows_theirs), len(mine) * count - len(rows_ours)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else float("inf")


@torch.no_grad()
def output_differences(ours: nn.Module, theirs: nn.Module, batch: NestedTensor) -> tuple[dict[str, float], int]:
    """Largest absolute differences of the last decoder layer's logits and boxes (normalised CXCYWH),
    for two-stage also of the encoder's proposals (every token), and the queries only one of the
    two-stage models chose (see ``same_proposals``)."""
    expected = ours(batch)
    found = theirs(pixel_values=batch.tensors, pixel_mask=(~batch.mask).long())
    mine, their, unmatched = (expected["pred_logits"], expected["pred_boxes"]), (found.logits, found.pred_boxes), 0
    differences = {}
    if "enc_outputs" in expected:
        proposals = expected["enc_outputs"]
        differences = {"proposal_logits": _max_diff(proposals["pred_logits"], found.enc_outputs_class),
                       "proposal_boxes": _max_diff(proposals["pred_boxes"], found.enc_outputs_coord_logits.sigmoid())}
        mine, their, unmatched = same_proposals((*mine, proposals["pred_logits"]), (*their, found.enc_outputs_class))
    return {**differences, "logits": _max_diff(mine[0], their[0]), "boxes": _max_diff(mine[1], their[1])}, unmatched


def _warn_dropped(dropped: list[str], where: Path) -> None:
    if dropped:
        logger.warning("%s: not converted (transformers has no place for them): %s", where, summarize_keys(dropped))


def _save_image_processor(config_args: argparse.Namespace, folder: Path) -> None:
    """The preprocessing of our evaluation as transformers' image processor of the model."""
    transformers = import_transformers()
    processor = (transformers.DetrImageProcessor if config_args.model == "detr"
                 else transformers.DeformableDetrImageProcessor)
    size = {"shortest_edge": config_args.min_size, "longest_edge": config_args.max_size}
    processor(size=size).save_pretrained(folder)


def _summary(direction: str, source: Path, destination: Path, model: str, dropped: list[str],
             differences: tuple[dict[str, float], int], tolerance: float) -> dict:
    worst = max(differences[0].values())
    transformers = import_transformers()
    return {"direction": direction, "source": str(source), "destination": str(destination), "model": model,
            "transformers": transformers.__version__, "dropped": dropped, "max_diff": differences[0],
            "unmatched_queries": differences[1], "tolerance": tolerance, "refused": worst > tolerance}


def to_hf(args: argparse.Namespace) -> dict:
    """Convert, save, reload with ``from_pretrained`` and compare; the files move into place only
    when the difference is within the tolerance."""
    checkpoint = load_checkpoint(args.source)
    state = model_state_of(checkpoint, args.source)
    refuse_inexpressible(inference_args({**checkpoint, "model": state}, "cpu"), str(args.source))
    model, postprocess, config_args, names = load_detector(args.source, "cpu", logger)
    hf_state, dropped = to_hf_state(state, config_args.model)
    _warn_dropped(dropped, args.source)
    classes = hf_state["class_labels_classifier.weight" if config_args.model == "detr" else "class_embed.0.weight"]
    num_labels = classes.shape[0] - (1 if config_args.model == "detr" else 0)
    model_class = hf_model_class(config_args.model)
    hf_model = model_class(hf_config(config_args, num_labels, names))
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    if missing or unexpected:
        raise ConversionError(f"{args.source}: the converted weights do not fit transformers' model: missing "
                              f"{summarize_keys(missing)}; unexpected {summarize_keys(unexpected)}")
    partial = args.destination.with_name(f".{args.destination.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        hf_model.save_pretrained(partial)
        _save_image_processor(config_args, partial)
        reloaded, info = model_class.from_pretrained(partial, local_files_only=True, output_loading_info=True)
        problems = {kind: keys for kind, keys in info.items() if keys}
        if problems:
            raise ConversionError(f"{args.destination}: transformers reloads it with {problems}")
        differences = output_differences(model, reloaded.eval(), sample_batch(args, model, postprocess, config_args))
        summary = _summary("to_hf", args.source, args.destination, config_args.model, dropped, differences,
                           args.tolerance)
        if not summary["refused"]:
            args.destination.mkdir(parents=True, exist_ok=True)
            for name in HF_FILES:
                os.replace(partial / name, args.destination / name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return summary


def _size_flags(folder: Path) -> list[str]:
    """--min_size/--max_size of a folder's preprocessor_config.json (shortest / longest edge), if any."""
    processor = folder / "preprocessor_config.json"
    size = json.loads(processor.read_text()).get("size", {}) if processor.is_file() else {}
    flags = [("--min_size", size.get("shortest_edge")), ("--max_size", size.get("longest_edge"))]
    return [str(part) for flag, value in flags if value for part in (flag, value)]


def from_hf(args: argparse.Namespace) -> dict:
    """Convert, save, load with our loader (strictly) and compare; the file moves into place only
    when the difference is within the tolerance."""
    transformers = import_transformers()
    if not (args.source / "config.json").is_file():
        raise ConfigError(f"{args.source}: not a transformers model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(args.source, local_files_only=True)
    config_args = parse_args(architecture_flags(config) + _size_flags(args.source))
    hf_model = hf_model_class(config_args.model).from_pretrained(args.source, local_files_only=True).eval()
    state, unmapped = from_hf_state(hf_model.state_dict(), config_args.model)
    if unmapped:
        raise ConversionError(f"{args.source}: weights without a place in our layout: {summarize_keys(unmapped)}")
    partial = args.destination.with_name(f".{args.destination.name}.partial")
    try:
        save_checkpoint(partial, {"model": state, "args": vars(config_args), "categories": category_names_of(config)})
        model, postprocess, loaded_args, _ = load_detector(partial, "cpu", logger)
        differing = differing_aliases(state, model)
        if differing:
            raise ConversionError(f"{args.source}: heads that are one module in our layout differ here: "
                                  f"{'; '.join(differing)}")
        differences = output_differences(model, hf_model, sample_batch(args, model, postprocess, loaded_args))
        summary = _summary("from_hf", args.source, args.destination, config_args.model, [], differences,
                           args.tolerance)
        if not summary["refused"]:
            os.replace(partial, args.destination)
    finally:
        partial.unlink(missing_ok=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = to_hf(args) if args.to else from_hf(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if summary["refused"]:
        print(f"error: the two models' outputs differ by {max(summary['max_diff'].values()):.3g} > --tolerance "
              f"{args.tolerance:g}; {args.destination} not written", file=sys.stderr)
    print(json.dumps(summary))
    return 1 if summary["refused"] else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: local files, no pretrained backbone
    sys.exit(main())
