"""Command-line and YAML configuration: defaults <- YAML (``--config``) <- CLI flags.

Flag names and defaults follow the official DETR code so that its commands keep working;
YAML keys are the same names. Values that depend on the model (learning rate, query count...)
default to ``None`` and are filled in from ``MODEL_DEFAULTS`` after parsing, so that a
YAML file or a flag always wins over the model default.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any, NoReturn

import yaml

from .methods import METHODS, add_method_arguments
from .models.vit import VIT_ARCHITECTURE_FLAGS, VIT_BACKBONES, add_backbone_arguments

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

MODELS = ("detr", "deformable_detr")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", *VIT_BACKBONES)
DATASETS = ("coco", "isaid", "folder")
SSL_TASKS = ("none", "reconstruction", "mim_continuous", "mim_discrete", "jigsaw_continuous", "jigsaw_discrete")
SCHEDULES = ("constant", "linear", "cosine")
COCO_EVAL_BACKENDS = ("pycocotools", "faster_coco_eval")

# What builds the model and prepares its input: `--eval --resume CKPT` takes these from the
# checkpoint's saved configuration unless the user gives them.
ARCHITECTURE_FLAGS = (
    "model", "backbone", "backbone_norm", "dilation", "position_embedding", "enc_layers", "dec_layers",
    "dim_feedforward", "hidden_dim", "nheads", "num_queries", "pre_norm", "aux_loss", "num_classes",
    "num_feature_levels", "enc_n_points", "dec_n_points", "with_box_refine", "two_stage", "ssl_task", "ssl_mode",
    "ssl_levels", "ssl_method", *(flag for method in METHODS.values() for flag in method.architecture_flags),
    *VIT_ARCHITECTURE_FLAGS,
    "min_size", "max_size",
)

# COCOeval's own object-size ranges (areas in px^2; 'inf' stands for its 1e5 ** 2).
COCO_AREA_RANGES = "small=0:1024,medium=1024:9216,large=9216:inf"
AREA_UNBOUNDED = 1e5 ** 2


def parse_area_ranges(text: str) -> list[tuple[str, float, float]]:
    """``'small=0:1024,medium=1024:9216,large=9216:inf'`` -> ``[(label, min_area, max_area), ...]``.

    Areas are box areas in square pixels; 'inf' becomes COCOeval's 1e10, so the default equals
    COCOeval's own ranges. 'all' (every size) is always evaluated and cannot be redefined.
    """
    ranges: list[tuple[str, float, float]] = []
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        label, sep, bounds = item.partition("=")
        low, colon, high = bounds.partition(":")
        label = label.strip()
        if not sep or not colon or not label.isidentifier():
            raise ValueError(f"expected LABEL=MIN:MAX (e.g. small=0:1024), got {item!r}")
        try:
            low_area, high_area = (AREA_UNBOUNDED if v.strip() == "inf" else float(v) for v in (low, high))
        except ValueError:
            raise ValueError(f"{item!r}: MIN and MAX must be numbers (areas in px^2) or 'inf'") from None
        if not 0 <= low_area < high_area <= AREA_UNBOUNDED:
            raise ValueError(f"{item!r}: need 0 <= MIN < MAX <= {AREA_UNBOUNDED:.0e} (or inf)")
        if label == "all" or label in (r[0] for r in ranges):
            raise ValueError(f"label {label!r} is {'reserved (every size)' if label == 'all' else 'given twice'}")
        ranges.append((label, low_area, high_area))
    if not ranges:
        raise ValueError(f"no ranges in {text!r}; expected e.g. {COCO_AREA_RANGES}")
    return ranges


OFFICIAL_NUM_WORKERS = 2

# Official per-model defaults (DETR main.py), applied where the user gave no value.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "detr": {
        "lr": 1e-4,
        "lr_backbone": 1e-5,
        "epochs": 300,
        "lr_drop": 200,
        "num_queries": 100,
        "dim_feedforward": 2048,
        "set_cost_class": 1.0,
    },
    "deformable_detr": {
        "lr": 2e-4,
        "lr_backbone": 2e-5,
        "epochs": 50,
        "lr_drop": 40,
        "num_queries": 300,
        "dim_feedforward": 1024,
        "set_cost_class": 2.0,
    },
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, but say 'model default' instead of 'None' for model-dependent ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None and action.dest in MODEL_DEFAULTS["detr"]:
            per_model = ", ".join(f"{m}: {d[action.dest]}" for m, d in MODEL_DEFAULTS.items())
            return f"{action.help} (default: {per_model})"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The one parser: every flag, its type, default and help text."""
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Train and evaluate DETR-family detectors with self-supervised pretext tasks.\n"
        "With no arguments, runs the demo (configs/demo.yaml) on data/sample.\n\n"
        "SIGTERM or SIGINT (Ctrl-C) during training finishes the optimizer step in progress, saves\n"
        "OUTPUT_DIR/checkpoint.pth and stops: exit code 0 after SIGTERM, 130 after SIGINT. --resume\n"
        "continues inside the interrupted epoch, at the next batch. A second signal while stopping is\n"
        "ignored (SIGKILL stops at once; the checkpoint file is replaced atomically either way).",
        formatter_class=_HelpFormatter,
    )
    add = parser.add_argument
    bool_flag = argparse.BooleanOptionalAction

    g = parser.add_argument_group("run")
    add = g.add_argument
    add("--config", type=str, default=None, help="YAML file of flag values; CLI flags override it")
    add("--model", type=str, default="detr", choices=MODELS, help="detector architecture")
    add("--output_dir", type=str, default="", help="where checkpoints, config, results and logs go ('' = save nothing)")
    add("--device", type=str, default="cuda", help="'cuda', 'cpu' or 'cuda:N'; falls back to CPU with a warning when CUDA is absent")
    add("--seed", type=int, default=42, help="random seed (each process adds its rank)")
    add("--resume", type=str, default="", metavar="CKPT",
        help="continue the run that wrote CKPT exactly (model, optimizer, scheduler, epoch, RNG); the model must match "
             "it key for key, else the run stops naming the differences. With --eval: the checkpoint to evaluate")
    add("--finetune", type=str, default="", metavar="CKPT",
        help="start a new run from another run's weights: every tensor whose name and shape fit loads (e.g. not a "
             "classifier for another class count), optimizer, schedule and epoch start afresh; the log lists loaded, "
             "skipped and new keys. For pre-training checkpoints use --pretrain")
    add("--start_epoch", type=int, default=0, metavar="N", help="first epoch number (overridden by --resume)")
    add("--eval", action="store_true", help="only evaluate (usually with --resume)")
    add("--eval_every", type=int, default=1, metavar="N", help="evaluate every N epochs during training (always after the last)")
    add("--num_workers", type=int, default=None,
        help="data-loading worker processes per training process; default: 2 (official) where the machine has more "
             "than 2 cores, 0 on 2 cores or fewer, where workers slow training down (they compete with the step's "
             "threads: docs/benchmarks.md)")
    add("--deterministic", action="store_true", help="bit-reproducible CPU runs (deterministic algorithms, seeded workers)")
    add("--debug", action="store_true",
        help="show the full traceback of expected errors (bad files, data or flags), which are otherwise one line")
    add("--tensorboard", action=bool_flag, default=True, help="write TensorBoard event files to OUTPUT_DIR/tensorboard")
    add("--checkpoint_every", type=int, default=1, metavar="N",
        help="save checkpoint.pth every N epochs and after the last (1: every epoch, official); a stop by signal "
             "or --max_bad_steps saves one anyway, a crash loses at most the last N - 1 epochs")
    add("--keep_last", type=int, default=2, metavar="K", help="also keep the last K per-epoch checkpoints checkpointNNNN.pth (0: only checkpoint.pth)")
    add("--limit_train_batches", type=int, default=None, metavar="N", help="at most N training batches per epoch (smoke runs, tests)")
    add("--limit_val_batches", type=int, default=None, metavar="N", help="at most N evaluation batches")

    g = parser.add_argument_group("model")
    add = g.add_argument
    add("--backbone", type=str, default="resnet50", choices=BACKBONES,
        help="torchvision ResNet, or timm ViT with ViTDet's windowed attention and simple feature pyramid (needs timm)")
    add("--backbone_weights", type=str, default="imagenet", metavar="{imagenet,none,PATH}",
        help="'imagenet' (torchvision download, cached; ResNets only), 'none' (random init) or a local .pth state dict "
             "(for a ViT: an MAE checkpoint mae_pretrain_vit_*.pth or a timm state dict)")
    add("--backbone_norm", type=str, default="frozen", choices=("frozen", "batch"),
        help="'frozen': FrozenBatchNorm2d (official; for pretrained weights); 'batch': trainable BatchNorm, and every backbone layer trains (training from scratch)")
    add("--dilation", action="store_true", help="replace the stride of the last ResNet stage by dilation (DC5)")
    add("--position_embedding", type=str, default="sine", choices=("sine", "learned"), help="encoding on top of the image features")
    add("--enc_layers", type=int, default=6, help="encoder layers")
    add("--dec_layers", type=int, default=6, help="decoder layers")
    add("--dim_feedforward", type=int, default=None, help="FFN width in the transformer blocks")
    add("--hidden_dim", type=int, default=256, help="transformer width")
    add("--dropout", type=float, default=0.1, help="dropout in the transformer")
    add("--nheads", type=int, default=8, help="attention heads")
    add("--num_queries", type=int, default=None, help="object queries")
    add("--pre_norm", action="store_true", help="pre-norm transformer layers (LayerNorm before attention/FFN)")
    add("--aux_loss", action=bool_flag, default=True, help="losses on every decoder layer (--no-aux_loss: last only)")
    add("--no_aux_loss", dest="aux_loss", action="store_false", help="same as --no-aux_loss (official DETR spelling)")
    add("--num_classes", type=int, default=None,
        help="classifier size = largest category id + 1; default: from the data (COCO: 91, as the official code; "
             "--dataset_file isaid: 16)")

    g = parser.add_argument_group("Deformable DETR")
    add = g.add_argument
    add("--num_feature_levels", type=int, default=4, help="feature levels: C3-C5 plus extra stride-2 levels")
    add("--enc_n_points", type=int, default=4, help="sampling points per head and level in encoder attention")
    add("--dec_n_points", type=int, default=4, help="sampling points per head and level in decoder cross-attention")
    add("--with_box_refine", action="store_true", help="iterative bounding-box refinement across decoder layers")
    add("--two_stage", action="store_true", help="encoder proposals become the decoder's reference boxes (needs --with_box_refine)")
    add("--cls_loss_coef", type=float, default=2.0, help="weight of the sigmoid focal classification loss")
    add("--focal_alpha", type=float, default=0.25, help="alpha of the sigmoid focal loss")
    add("--lr_linear_proj_mult", type=float, default=0.1, help="learning-rate factor of the sampling-offset and reference-point layers")
    add("--msda_backend", type=str, default="auto", choices=("auto", "cuda", "cpu", "pytorch"),
        help="deformable-attention implementation: CUDA kernel, C++ CPU kernel, or the PyTorch path; auto picks by device")

    g = parser.add_argument_group("self-supervised pretext task on the encoder")
    add = g.add_argument
    add("--ssl_task", type=str, default="none", choices=(*SSL_TASKS, *METHODS),
        help="pretext task on the encoder tokens; each token owns the image patch under it. A whole-detector method "
             "name (see --ssl_method) is a shorthand for --ssl_method NAME without an encoder task")
    add("--ssl_method", type=str, default="none", choices=("none", *METHODS),
        help="pre-training method, alone or next to an --ssl_task: updetr (whole detector: random query patches), "
             "detreg (find --proposals pseudo-boxes, regress their features), box_contrast (AlignDet/PreDet: contrast "
             "the pseudo-boxes' queries across two views); mae (the ViT backbone alone: masked autoencoding of "
             "crops, alone); each with its flags below")
    add("--ssl_mode", type=str, default="multitask", choices=("pretrain", "multitask"),
        help="pretrain: SSL loss only (labelled or unlabelled images, no decoder); multitask: detection + weighted SSL loss")
    add("--ssl_ratio", type=float, default=0.5, help="fraction of each image's patches masked or permuted")
    add("--ssl_ratio_schedule", type=str, default="constant", choices=SCHEDULES,
        help="ratio over training: constant, or decaying every optimizer step (linear, cosine) to reach 0 just after "
             "the last one")
    add("--ssl_loss_coef", type=float, default=1.0, help="weight (lambda) of the SSL loss")
    add("--ssl_loss_schedule", type=str, default="constant", choices=SCHEDULES,
        help="lambda over training (multitask only): constant, or decaying every optimizer step (linear, cosine) to "
             "reach 0 just after the last one")
    add("--ssl_levels", action="store_true",
        help="Deformable DETR: every encoder level also predicts the pixels of its own patches (the paper used the finest only)")
    add("--ssl_backbone_grad", action=bool_flag, default=True,
        help="the SSL loss trains the backbone too (the paper); --no-ssl_backbone_grad runs the corrupted images' "
             "backbone pass without gradients, so the task trains encoder and head only: a multi-task DETR step then "
             "costs about 1.4x the plain one instead of 1.8x on a CPU (docs/benchmarks.md)")
    add("--tokenizer", type=str, default=None, help="visual-token file for mim_discrete (scripts/fit_tokenizer.py)")
    add("--pretrain", type=str, default="", metavar="CKPT",
        help="start detection from a pre-training checkpoint: backbone, input projection and encoder load (from a "
             "--query_patches or official UP-DETR checkpoint also decoder, queries and box head); the rest is new")
    add("--vis_every", type=int, default=200, metavar="N",
        help="TensorBoard image grid (input, corrupted, prediction, target; query-patch crops and boxes) every N steps (0: never)")

    g = parser.add_argument_group("matcher and loss")
    add = g.add_argument
    add("--set_cost_class", type=float, default=None, help="class cost in the Hungarian matcher")
    add("--set_cost_bbox", type=float, default=5.0, help="L1 box cost in the matcher")
    add("--set_cost_giou", type=float, default=2.0, help="GIoU cost in the matcher")
    add("--bbox_loss_coef", type=float, default=5.0, help="weight of the L1 box loss")
    add("--giou_loss_coef", type=float, default=2.0, help="weight of the GIoU loss")
    add("--eos_coef", type=float, default=0.1, help="relative classification weight of the no-object class")

    g = parser.add_argument_group("optimisation")
    add = g.add_argument
    add("--lr", type=float, default=None, help="AdamW learning rate of the transformer and heads")
    add("--lr_backbone", type=float, default=None, help="backbone learning rate (0 freezes the backbone)")
    add("--batch_size", type=int, default=2, help="images per process and step")
    add("--accum_steps", type=int, default=1, help="accumulate gradients over N batches before each optimizer step")
    add("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    add("--adam_betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("BETA1", "BETA2"),
        help="AdamW's running-average coefficients (0.9 0.999: PyTorch's and the official DETR's; MAE: 0.9 0.95)")
    add("--epochs", type=int, default=None, help="training epochs")
    add("--lr_drop", type=int, default=None, help="multiply the learning rates by 0.1 after this many epochs")
    add("--lr_scheduler", type=str, default="step", choices=("step", "cosine"),
        help="step: x0.1 every --lr_drop epochs (official; stepped per epoch, or per optimizer step with warmup); "
             "cosine: decay every optimizer step from each group's lr to --min_lr (scaled alike) at the end of the run")
    add("--min_lr", type=float, default=0.0, help="the --lr group's learning rate at the end of --lr_scheduler cosine")
    add("--warmup_epochs", type=float, default=0.0, metavar="E",
        help="linear warmup of every learning rate over the first E epochs (fractions allowed), per optimizer step")
    add("--warmup_iters", type=int, default=0, metavar="N",
        help="linear warmup over the first N optimizer steps instead of --warmup_epochs")
    add("--warmup_factor", type=float, default=0.0, metavar="F",
        help="the learning rates of the first warmup step, as a fraction of their values (0: from 0, as MAE)")
    add("--layer_decay", type=float, default=1.0, metavar="D",
        help="layer-wise lr decay: backbone layer i of depth trains at --lr_backbone x D^(depth - i); ViT: patch and "
             "position embeddings 0, block N N+1 (0.7 for ViT-B as ViTDet); ResNet: stem 0, layer1-layer4 1-4; "
             "1: off (official)")
    add("--no_decay_norm_bias", action="store_true",
        help="no weight decay on norms, biases, position tables (pos_embed, rel_pos) and query / level embeddings "
             "(ViTDet); off: --weight_decay on every parameter (official)")
    add("--model_ema", action="store_true",
        help="keep an exponential moving average of the weights (buffers included), updated after every optimizer "
             "step, evaluated next to the model (val_ema_* in log.jsonl) and saved as 'model_ema' in checkpoints")
    add("--model_ema_decay", type=float, default=0.9998, help="EMA decay per optimizer step of --model_ema")
    add("--eval_ema", action="store_true",
        help="with --eval --resume CKPT: evaluate the checkpoint's EMA weights (of a --model_ema run), not its model")
    add("--amp", action="store_true", help="mixed precision: autocast the model (the losses stay float32)")
    add("--amp_dtype", type=str, default="auto", choices=("auto", "bfloat16", "float16"),
        help="autocast dtype under --amp; auto: bfloat16 on GPUs that support it (else float16, with loss scaling) "
             "and on CPUs with native bfloat16 (AVX512-BF16, AMX); float32 on CPUs that would emulate it (slower)")
    add("--clip_max_norm", type=float, default=0.1, help="gradient clipping max norm (0: no clipping)")
    add("--max_bad_steps", type=int, default=5, metavar="N",
        help="a non-finite loss skips its optimizer step (logged with the batch's image ids); after N such steps "
             "in a row the run saves the last good state to OUTPUT_DIR/checkpoint.pth and fails")

    g = parser.add_argument_group("data")
    add = g.add_argument
    add("--dataset_file", type=str, default="coco", choices=DATASETS,
        help="coco: COCO-json detection data (official COCO 2017 layout, or ROOT/{train,val}/ + ROOT/annotations/instances_{train,val}.json); "
             "isaid: the second layout with iSAID's 15 categories, as scripts/prepare_isaid.py writes it (other categories are refused); "
             "folder: any tree of unlabelled images (pre-training)")
    add("--data_path", type=str, default=None, help="dataset root (see README: data layout)")
    add("--coco_path", type=str, default=None, help="alias of --data_path (official DETR flag name)")
    add("--train_split", type=str, default="train", help="split used for training (folder and json name)")
    add("--val_split", type=str, default="val", help="split used for evaluation ('train' = an overfitting check)")
    add("--val_path", type=str, default=None, metavar="DIR",
        help="--ssl_mode pretrain: a folder tree of held-out images on which every evaluation reports the pretext "
             "losses (default: the --val_split of COCO-json data; none for --dataset_file folder)")
    add("--proposals", type=str, default=None, metavar="FILE",
        help="pseudo-boxes of the --dataset_file folder images (scripts/propose_boxes.py): the targets of "
             "--ssl_method detreg and box_contrast; augmentation moves them like labels")
    add("--proposal_top_k", type=int, default=None, metavar="K",
        help="use only the K best-ranked pseudo-boxes of each image (default: all the file holds)")
    add("--val_proposals", type=str, default=None, metavar="FILE",
        help="pseudo-boxes of the --val_path images, for the validation loss of a pseudo-box method")
    add("--min_size", type=int, default=800,
        help="shorter image side at evaluation and the largest training scale; the official scales 480..800 are multiplied by MIN_SIZE/800")
    add("--max_size", type=int, default=1333, help="cap on the longer image side")
    add("--augment", action=bool_flag, default=True, help="official DETR training augmentation (flip, multi-scale resize, random crop)")
    add("--filter_empty", action="store_true", help="drop training images without annotations (kept by default: they teach 'no object')")
    add("--train_fraction", type=float, default=1.0, metavar="F",
        help="train on round(F x N) (at least 1) of the N labelled training images: the first ids of a permutation of "
             "the sorted ids drawn with --fraction_seed (numpy PCG64), so smaller fractions nest in larger ones; the "
             "ids go to OUTPUT_DIR/train_subset.json; evaluation uses the whole --val_split")
    add("--fraction_seed", type=int, default=0, metavar="S",
        help="seed of the --train_fraction / --shots choice (the same S: the same images on any machine and process "
             "count); a study's folds are S = 0, 1, ...")
    add("--shots", type=int, default=None, metavar="K",
        help="few-shot training set (after TFA): categories in id order each shuffle their images with --fraction_seed "
             "and take them until K chosen images hold the category (images chosen for earlier ones count; one with "
             "fewer gets all); chosen images keep every annotation, so a category can appear in more than K")
    add("--max_dets", type=int, default=100, help="detections kept per image and COCOeval's largest maxDets")
    add("--area_ranges", type=str, default=COCO_AREA_RANGES, metavar="LABEL=MIN:MAX,...",
        help="object-size ranges of the AP/AR rows, as box areas in square pixels ('inf' allowed); labels small, "
             "medium, large give APs/APm/APl, any other LABEL gives AP_LABEL/AR_LABEL. Aerial objects are mostly "
             "small: e.g. tiny=0:256,small=256:1024,medium=1024:9216,large=9216:inf")
    add("--coco_eval_backend", type=str, default="pycocotools", choices=COCO_EVAL_BACKENDS,
        help="library computing the COCO box metrics: pycocotools (official) or faster_coco_eval (same numbers, "
             "C++ matching; many times faster on dense scenes; pip install -e '.[fast-eval]')")
    add("--skip_bad_samples", action="store_true",
        help="skip bad input instead of stopping: records with an unknown category, a box outside the image or not "
             "finite, images with a missing, truncated or wrongly sized file; each is logged by file and record")
    add("--check_data", type=str, default="quick", choices=("quick", "full", "none"),
        help="before training, check every image and record and stop listing all problems (with --skip_bad_samples: "
             "log them); quick: image headers and sizes, boxes, category ids, missing files (well under 1 s per "
             "1,000 images); full: also decode every image, to find truncated files; none: no check")
    add_method_arguments(parser)
    add_backbone_arguments(parser)
    return parser


def _check_yaml_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, where: str) -> Any:
    """Type- and choice-check one YAML value against its flag; return it converted."""
    key = action.dest

    def fail(why: str) -> None:
        parser.error(f"{where}: key '{key}': {why}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            fail(f"expected true or false, got {value!r}")
        return value
    if value is None:
        return None
    if action.nargs is not None and action.nargs != "?":  # a list flag (e.g. --adam_betas 0.9 0.95)
        count = action.nargs if isinstance(action.nargs, int) else None
        if not isinstance(value, list) or (count is not None and len(value) != count):
            fail(f"expected a list of {count or 'some'} values, got {value!r}")
        return [_check_yaml_value(parser, _single(action), item, where) for item in value]
    expected = action.type or str
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected in (int, float, str) and (not isinstance(value, expected) or isinstance(value, bool)):
        fail(f"expected {expected.__name__}, got {type(value).__name__} {value!r}")
    if action.choices is not None and value not in action.choices:
        fail(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _single(action: argparse.Action) -> argparse.Action:
    """A list flag's action for one of its items (the same type and choices)."""
    return argparse.Action(action.option_strings, action.dest, type=action.type, choices=action.choices)


def load_yaml_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Read a YAML config, refusing unknown keys and ill-typed values by name."""
    file = Path(path)
    if not file.is_file():
        parser.error(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        parser.error(f"{path}: not valid YAML: {err}")
    if not isinstance(data, dict):
        parser.error(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in data.items():
        if key not in actions:
            close = [k for k in actions if k.split("_")[0] == str(key).split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            parser.error(f"{path}: unknown key '{key}'{hint}; keys are the flag names of `main.py --help`")
        values[key] = _check_yaml_value(parser, actions[key], value, path)
    return values


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible values before any work starts, naming the flag."""
    positive = ["lr", "batch_size", "epochs", "checkpoint_every", "hidden_dim", "nheads", "num_queries", "dim_feedforward",
                "accum_steps", "min_size", "max_size", "max_dets", "lr_drop", "eval_every", "max_bad_steps"]
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    non_negative = ["lr_backbone", "weight_decay", "clip_max_norm", "num_workers", "keep_last", "start_epoch",
                    "enc_layers", "set_cost_class", "set_cost_bbox", "set_cost_giou", "eos_coef",
                    "bbox_loss_coef", "giou_loss_coef"]
    for name in non_negative:
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not all(0 <= beta < 1 for beta in args.adam_betas):
        parser.error(f"--adam_betas must each be in [0, 1), got {' '.join(map(str, args.adam_betas))}")
    if args.model == "deformable_detr":
        for name in ("num_feature_levels", "enc_n_points", "dec_n_points"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.num_feature_levels == 2:
            parser.error("--num_feature_levels must be 1 (C5 only) or >= 3 (C3-C5, then extra stride-2 levels), got 2")
        if args.two_stage and not args.with_box_refine:
            parser.error("--two_stage needs --with_box_refine (the official two-stage model refines boxes)")
        if args.pre_norm:
            parser.error("--pre_norm: Deformable DETR layers are post-norm only")
        if args.hidden_dim % 32:
            parser.error(f"--hidden_dim must be a multiple of 32 for Deformable DETR (GroupNorm(32)), got {args.hidden_dim}")
        if not 0 <= args.focal_alpha <= 1:
            parser.error(f"--focal_alpha must be in [0, 1], got {args.focal_alpha}")
        if args.lr_linear_proj_mult < 0:
            parser.error(f"--lr_linear_proj_mult must be >= 0, got {args.lr_linear_proj_mult}")
    elif args.with_box_refine or args.two_stage:
        parser.error("--with_box_refine and --two_stage are Deformable DETR options (--model deformable_detr)")
    if args.ssl_task == "none" and args.ssl_method == "none" and args.ssl_mode == "pretrain":
        parser.error("--ssl_mode pretrain needs a pretext task: set --ssl_task and/or --ssl_method")
    if args.ssl_method != "none":
        method = METHODS[args.ssl_method]
        if args.ssl_mode not in method.modes:
            parser.error(f"--ssl_method {args.ssl_method} pre-trains the whole detector on its own: use it with "
                         f"--ssl_mode {' or '.join(method.modes)}, then start detection with --pretrain CKPT")
        method.validate(args, parser.error)
    if args.ssl_mode == "pretrain" and args.ssl_loss_schedule != "constant":
        parser.error(f"--ssl_loss_schedule {args.ssl_loss_schedule} weighs the SSL loss against detection, which "
                     "--ssl_mode pretrain does not train: there it would only scale the loss down (a learning-rate "
                     "decay in disguise); drop it, or use --lr_drop")
    if args.ssl_method != "updetr" and (args.feature_recon or args.query_shuffle):
        parser.error("--feature_recon and --query_shuffle are options of the query patches: add --query_patches")
    if not args.ssl_backbone_grad:
        if args.ssl_task == "none":
            parser.error("--no-ssl_backbone_grad needs an --ssl_task (it keeps that task's loss out of the backbone)")
        if args.ssl_task == "reconstruction" and (args.ssl_mode == "multitask" or args.ssl_method != "none"):
            parser.error("--no-ssl_backbone_grad cannot apply to reconstruction next to detection or query patches: the "
                         "task reads the encoder tokens of the same clean pass, whose backbone they train; drop the flag")
    if args.ssl_task == "mim_discrete" and not args.tokenizer:
        parser.error("--ssl_task mim_discrete needs --tokenizer FILE (fit one with scripts/fit_tokenizer.py)")
    if args.ssl_levels and (args.ssl_task == "none" or args.model != "deformable_detr" or args.num_feature_levels < 2):
        parser.error("--ssl_levels needs an --ssl_task and --model deformable_detr with several --num_feature_levels")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        parser.error(f"--tokenizer: file not found: {args.tokenizer}")
    if args.pretrain and not Path(args.pretrain).is_file():
        parser.error(f"--pretrain: checkpoint not found: {args.pretrain}")
    if args.finetune and not Path(args.finetune).is_file():
        parser.error(f"--finetune: checkpoint not found: {args.finetune}")
    starts = [f"--{name}" for name in ("resume", "finetune", "pretrain") if getattr(args, name)]
    if len(starts) > 1:
        parser.error(f"{' and '.join(starts)}: give one. --resume continues a run exactly, --finetune starts a new "
                     "run from its weights, --pretrain from the pre-trained part of a pre-training checkpoint")
    if not 0.0 <= args.ssl_ratio <= 1.0:
        parser.error(f"--ssl_ratio must be in [0, 1], got {args.ssl_ratio}")
    if args.ssl_loss_coef < 0 or args.vis_every < 0:
        parser.error("--ssl_loss_coef and --vis_every must be >= 0")
    try:
        parse_area_ranges(args.area_ranges)
    except ValueError as err:
        parser.error(f"--area_ranges: {err}")
    if args.coco_eval_backend == "faster_coco_eval" and importlib.util.find_spec("faster_coco_eval") is None:
        parser.error("--coco_eval_backend faster_coco_eval: the faster-coco-eval package is not installed "
                     "(pip install -e '.[fast-eval]', or pip install faster-coco-eval)")
    for name in ("proposals", "val_proposals"):
        if getattr(args, name) and not Path(getattr(args, name)).is_file():
            parser.error(f"--{name}: file not found: {getattr(args, name)} (compute it with scripts/propose_boxes.py)")
    if args.proposals and args.dataset_file != "folder":
        parser.error("--proposals gives pseudo-boxes to unlabelled images: use it with --dataset_file folder")
    if args.proposal_top_k is not None and args.proposal_top_k < 1:
        parser.error(f"--proposal_top_k must be >= 1 when given, got {args.proposal_top_k}")
    method = METHODS.get(args.ssl_method)
    if method is not None and method.needs_proposals and args.val_path and not args.val_proposals:
        parser.error(f"--ssl_method {args.ssl_method} validates on pseudo-boxes: with --val_path give "
                     "--val_proposals FILE too (scripts/propose_boxes.py --images VAL_DIR)")
    if args.val_proposals and not args.val_path:
        parser.error("--val_proposals holds the pseudo-boxes of --val_path images: give --val_path DIR too")
    if args.val_path is not None:
        if args.ssl_mode != "pretrain":
            parser.error("--val_path holds unlabelled held-out images for --ssl_mode pretrain; detection evaluates on "
                         "--val_split of --data_path")
        if not Path(args.val_path).is_dir():
            parser.error(f"--val_path: not a folder: {args.val_path}")
    if args.eval and args.ssl_mode == "pretrain" and args.dataset_file == "folder" and args.val_path is None:
        parser.error("--eval of a pre-training run reports its pretext losses on held-out images: pass --val_path DIR "
                     "(a folder of images not used for training)")
    if args.dataset_file == "folder" and args.ssl_mode != "pretrain":
        parser.error("--dataset_file folder holds unlabelled images: use it with --ssl_mode pretrain and an "
                     "--ssl_task and/or --ssl_method")
    _validate_label_budget(parser, args)
    _validate_recipe(parser, args)
    if args.dec_layers < 1:
        parser.error(f"--dec_layers must be >= 1, got {args.dec_layers}")
    for name in ("limit_train_batches", "limit_val_batches", "num_classes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1 when given, got {value}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.hidden_dim % args.nheads:
        parser.error(f"--hidden_dim ({args.hidden_dim}) must be divisible by --nheads ({args.nheads})")
    if args.position_embedding == "sine" and args.hidden_dim % 2:
        parser.error(f"--hidden_dim must be even for the sine position embedding, got {args.hidden_dim}")
    if args.max_size < args.min_size:
        parser.error(f"--max_size ({args.max_size}) must be >= --min_size ({args.min_size})")
    if args.set_cost_class == args.set_cost_bbox == args.set_cost_giou == 0:
        parser.error("the matcher costs --set_cost_class/--set_cost_bbox/--set_cost_giou cannot all be 0")
    if args.backbone_weights not in ("imagenet", "none") and not Path(args.backbone_weights).is_file():
        parser.error(f"--backbone_weights: expected 'imagenet', 'none' or an existing file, got {args.backbone_weights!r}")
    if args.resume and not args.resume.startswith(("http://", "https://")) and not Path(args.resume).is_file():
        parser.error(f"--resume: checkpoint not found: {args.resume}")
    if args.data_path and args.coco_path and args.data_path != args.coco_path:
        parser.error(f"--data_path ({args.data_path}) and --coco_path ({args.coco_path}) disagree; give one")


def _validate_recipe(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The lr schedule, layer decay and EMA flags: in range, and not contradicting each other."""
    if args.warmup_epochs < 0 or args.warmup_iters < 0:
        parser.error("--warmup_epochs and --warmup_iters must be >= 0")
    if args.warmup_epochs > 0 and args.warmup_iters > 0:
        parser.error(f"--warmup_epochs {args.warmup_epochs} and --warmup_iters {args.warmup_iters}: give one")
    if not 0 <= args.warmup_factor <= 1:
        parser.error(f"--warmup_factor must be in [0, 1], got {args.warmup_factor}")
    if not 0 <= args.min_lr <= args.lr:
        parser.error(f"--min_lr must be in [0, --lr {args.lr}], got {args.min_lr}")
    if args.min_lr and args.lr_scheduler != "cosine":
        parser.error(f"--min_lr {args.min_lr} is where --lr_scheduler cosine ends: add it (--lr_scheduler "
                     f"{args.lr_scheduler} drops by 0.1 every --lr_drop epochs)")
    if not 0 < args.layer_decay <= 1:
        parser.error(f"--layer_decay must be in (0, 1] (1: off), got {args.layer_decay}")
    if not 0 < args.model_ema_decay < 1:
        parser.error(f"--model_ema_decay must be in (0, 1), got {args.model_ema_decay}")
    if args.eval_ema and not (args.eval and args.resume):
        parser.error("--eval_ema evaluates a checkpoint's EMA weights: use it with --eval --resume CKPT")


def _validate_label_budget(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--train_fraction / --shots choose labelled training images: one of them, in range, not on a folder."""
    if not 0 < args.train_fraction <= 1:
        parser.error(f"--train_fraction must be in (0, 1], got {args.train_fraction}")
    if args.shots is not None and args.shots < 1:
        parser.error(f"--shots must be >= 1 when given, got {args.shots}")
    if args.fraction_seed < 0:
        parser.error(f"--fraction_seed must be >= 0, got {args.fraction_seed}")
    if args.shots is not None and args.train_fraction < 1:
        parser.error(f"--shots {args.shots} and --train_fraction {args.train_fraction}: give one label budget")
    if (args.shots is not None or args.train_fraction < 1) and args.dataset_file == "folder":
        parser.error("--train_fraction and --shots choose among labelled training images: --dataset_file folder has "
                     "no labels (pre-training uses every image)")


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers() -> int:
    """The official 2 data-loading workers where cores are left for them, none on 2 cores or fewer:
    there the workers' decoding competes with the step's OpenMP threads (DETR-R50 on 2 cores: 4
    epochs in 74.5 s with 2 workers, 56.4 s with none; docs/benchmarks.md)."""
    return OFFICIAL_NUM_WORKERS if available_cores() > 2 else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into a validated, fully resolved namespace.

    Order of precedence: parser defaults < model defaults < YAML ``--config`` < CLI flags.
    ``args.given`` lists the flags that YAML or CLI set (the rest are defaults).
    """
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    from_yaml = load_yaml_config(parser, pre.config) if pre.config else {}
    parser.set_defaults(**from_yaml)
    args = parser.parse_args(argv)
    args.given = sorted({*from_yaml, *_flags_on_command_line(argv)})
    resolve_method(args, parser.error)
    if args.fre_cnn:
        if args.lr_backbone not in (None, 0):
            parser.error(f"--fre_cnn freezes the backbone: it contradicts --lr_backbone {args.lr_backbone}")
        args.lr_backbone = 0.0
    given = set(args.given) | ({"lr_backbone"} if args.lr_backbone is not None else set())
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.ssl_method != "none":
        METHODS[args.ssl_method].configure(args, given)
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    args.data_path = args.data_path or args.coco_path
    args.coco_path = args.data_path
    _validate(parser, args)
    return args


def resolve_method(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> None:
    """Normalise the method flags: ``--ssl_task METHOD`` is ``--ssl_method METHOD`` without an encoder
    task, ``--query_patches`` is ``--ssl_method updetr`` (and saved configurations of either kind
    read back the same); afterwards ``ssl_task`` names an encoder task or none and
    ``query_patches`` says whether the method is UP-DETR."""
    if args.ssl_task in METHODS:
        if args.ssl_method not in ("none", args.ssl_task):
            error(f"--ssl_task {args.ssl_task} and --ssl_method {args.ssl_method}: one whole-detector method per run")
        args.ssl_task, args.ssl_method = "none", args.ssl_task
    if getattr(args, "query_patches", False):
        if args.ssl_method not in ("none", "updetr"):
            error(f"--query_patches (UP-DETR) and --ssl_method {args.ssl_method}: one whole-detector method per run")
        args.ssl_method = "updetr"
    args.query_patches = args.ssl_method == "updetr"


def _flags_on_command_line(argv: list[str] | None) -> set[str]:
    """The destinations of the flags ``argv`` itself sets (not their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def save_config(args: argparse.Namespace, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML that ``--config`` reads back."""
    values = {k: v for k, v in sorted(vars(args).items()) if k not in ("config", "given")}
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))
