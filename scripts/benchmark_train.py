"""Time one training step (forward, loss, backward, clip, AdamW) and print JSON.

    python scripts/benchmark_train.py --model detr              # DETR-R50, batch 2, 512x512, 100 queries, fp32
    python scripts/benchmark_train.py --model deformable_detr   # Deformable DETR-R50, 4 levels, 300 queries
    python scripts/benchmark_train.py --model deformable_detr --msda_backend pytorch   # any main.py flag passes through
    python scripts/benchmark_train.py --model detr --amp        # bfloat16 autocast on a CPU
    python scripts/benchmark_train.py --model detr --ssl_task mim_continuous   # multi-task SSL step
    python scripts/benchmark_train.py --model detr --ssl_task mim_continuous --overhead   # ... / plain step
    python scripts/benchmark_train.py --model detr --ssl_method detreg --overhead   # DETReg step / plain step
    python scripts/benchmark_train.py --model detr --ssl_method box_contrast --overhead   # two views / plain step
    python scripts/benchmark_train.py --model detr --backbone vit_small_patch16   # ViT + simple pyramid (timm)
    python scripts/benchmark_train.py --model detr --backbone vit_base_patch16 --ssl_method mae --ssl_mode pretrain \
        --size 224 --batch_size 8                                 # MAE pre-training step of the ViT
    python scripts/benchmark_train.py --model detr --peer hf    # also Hugging Face transformers' DETR, alternating
    python scripts/benchmark_train.py --model deformable_detr --peer official --official_repo ~/src/Deformable-DETR
    python scripts/benchmark_train.py --model detr --profile    # also print torch.profiler's top ops
    python scripts/benchmark_train.py --model deformable_detr --without dropout_kernel   # ... / F.dropout step

Inputs are real sample photos resized to SIZE x SIZE with their real boxes, so the matcher and
losses do real work. Timing excludes data loading. ``--overhead`` also builds the same detector
without the self-supervised flags and times its step alternately with the measured one, in the
same process, so that the ratio holds even when the machine's speed drifts. ``--peer hf`` does the
same with the peer users pick instead: Hugging Face ``transformers``' DetrForObjectDetection /
DeformableDetrForObjectDetection (timm backbone of the same name, random init, nothing downloaded)
with its own matcher and loss, on the same batch, with AdamW at ``--lr`` and the same clipping
(``pip install -e '.[hf]'``; without transformers the script says so and stops). ``--peer official
--official_repo PATH`` times the official facebookresearch/detr or fundamentalvision/Deformable-DETR
checkout's model and criterion the same way: imported from PATH with the run-time shims of
``scripts/compare_official.py`` (its CPU path of deformable attention, ``ms_deform_attn_core_pytorch``),
built by its own parser from the same flags, its frozen BatchNorm statistics measured on the batch.
``--without LEVER`` times the same step (same seed and weights, a second model) with one of the
package's speed levers switched off, alternately: ``dropout_kernel`` (``F.dropout`` instead of the
CPU dropout kernel of ``detr_ssl.ops.seeded_dropout``), ``fused_adamw`` (AdamW's per-tensor loop
instead of its fused CPU kernel).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
sys.path.insert(0, str(REPO))

from detr_ssl.config import MODEL_DEFAULTS, parse_args  # noqa: E402
from detr_ssl.data import build_dataset, collate_fn  # noqa: E402
from detr_ssl.engine.amp import amp_dtype, autocast, to_float32  # noqa: E402
from detr_ssl.engine.optim import build_optimizer, set_fused_on_cpu  # noqa: E402
from detr_ssl.engine.train import weighted_loss  # noqa: E402
from detr_ssl.methods import METHODS  # noqa: E402
from detr_ssl.models import build_model  # noqa: E402
from detr_ssl.ops import seeded_dropout  # noqa: E402
from detr_ssl.utils.machine import machine_info  # noqa: E402
from detr_ssl.utils.misc import NestedTensor  # noqa: E402


def pseudo_box_flags(extra: list[str]) -> list[str]:
    """For a pseudo-box method (DETReg, box_contrast), the data flags it requires: the batch itself is
    the sample's labelled photos with their boxes as pseudo-boxes (``pseudo_box_batch``), so the
    --proposals file given is only checked to exist."""
    named = {value for flag, value in zip(extra, extra[1:]) if flag in ("--ssl_method", "--ssl_task")}
    if not any(name in METHODS and METHODS[name].needs_proposals for name in named):
        return []
    return ["--dataset_file", "folder", "--data_path", str(SAMPLE / "unlabelled"), "--ssl_mode", "pretrain",
            "--proposals", str(SAMPLE / "annotations" / "instances_train.json")]


def sample_batch(args: argparse.Namespace, batch_size: int, size: int, device: torch.device):
    """``batch_size`` sample images resized to size x size, with their targets."""
    dataset = build_dataset("train", args)
    items = [dataset[i % len(dataset)] for i in range(batch_size)]
    images = [torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear")[0] for img, _ in items]
    samples, targets = collate_fn(list(zip(images, [t for _, t in items])))
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return samples.to(device), targets


Step = tuple[Callable[[], None], int]  # one optimizer step as a function, and the model's parameter count


def training_step(args: argparse.Namespace, device: torch.device, samples, targets) -> Step:
    """One optimizer step of the detector that ``args`` describes (seeded), as a function."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    model.to(device).train()
    criterion.to(device)
    optimizer = build_optimizer(model, args)

    def step() -> None:
        with autocast(args, device):
            outputs = to_float32(model(samples))
        loss = weighted_loss(criterion(outputs, targets), criterion.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def hf_training_step(args: argparse.Namespace, device: torch.device, samples: NestedTensor,
                     targets: list[dict]) -> Step:
    """The same optimizer step in Hugging Face transformers' detector of the same architecture."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config builds without the hub; never reach it
    try:
        import transformers
    except ImportError:
        raise SystemExit("--peer hf needs transformers and timm: pip install -e '.[hf]'") from None
    common = dict(use_timm_backbone=True, backbone=args.backbone, use_pretrained_backbone=False,
                  num_queries=args.num_queries, num_labels=args.num_classes or 91, d_model=args.hidden_dim,
                  encoder_layers=args.enc_layers, decoder_layers=args.dec_layers,
                  encoder_ffn_dim=args.dim_feedforward, decoder_ffn_dim=args.dim_feedforward,
                  encoder_attention_heads=args.nheads, decoder_attention_heads=args.nheads,
                  dropout=args.dropout, auxiliary_loss=args.aux_loss, dilation=args.dilation)
    torch.manual_seed(0)
    if args.model == "detr":
        model = transformers.DetrForObjectDetection(transformers.DetrConfig(**common))
    else:
        config = transformers.DeformableDetrConfig(
            **common, num_feature_levels=args.num_feature_levels, encoder_n_points=args.enc_n_points,
            decoder_n_points=args.dec_n_points, with_box_refine=args.with_box_refine, two_stage=args.two_stage)
        model = transformers.DeformableDetrForObjectDetection(config)
    model.to(device).train()
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    pixel_mask = (~samples.mask).long()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)

    def step() -> None:
        loss = model(pixel_values=samples.tensors, pixel_mask=pixel_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def official_argv(args: argparse.Namespace) -> list[str]:
    """The official parser's flags for the architecture ``args`` describes."""
    argv = ["--backbone", args.backbone, "--position_embedding", args.position_embedding, "--lr", str(args.lr),
            "--num_queries", str(args.num_queries), "--enc_layers", str(args.enc_layers),
            "--dec_layers", str(args.dec_layers), "--dim_feedforward", str(args.dim_feedforward),
            "--hidden_dim", str(args.hidden_dim), "--nheads", str(args.nheads), "--dropout", str(args.dropout),
            "--device", "cpu", *(["--dilation"] if args.dilation else []), *([] if args.aux_loss else ["--no_aux_loss"])]
    if args.model == "deformable_detr":
        argv += ["--num_feature_levels", str(args.num_feature_levels), "--enc_n_points", str(args.enc_n_points),
                 "--dec_n_points", str(args.dec_n_points), *(["--with_box_refine"] if args.with_box_refine else []),
                 *(["--two_stage"] if args.two_stage else [])]
    return argv


def official_training_step(args: argparse.Namespace, device: torch.device, samples: NestedTensor,
                           targets: list[dict], repo: Path) -> Step:
    """The same optimizer step in the official checkout at ``repo``."""
    spec = importlib.util.spec_from_file_location("compare_official", REPO / "scripts" / "compare_official.py")
    compare = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
    spec.loader.exec_module(compare)
    official = compare.import_official(repo, args.model)
    torch.manual_seed(0)
    side = compare.build_official(official, args.model, official_argv(args))
    model, criterion = side.model.to(device).train(), side.criterion.to(device)
    compare.calibrate_frozen_batchnorm(model, samples.tensors)  # a random backbone needs real statistics
    batch = importlib.import_module("util.misc").NestedTensor(samples.tensors, samples.mask)  # the official class
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)

    def step() -> None:
        losses = criterion(model(batch), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def without_self_supervision(args: argparse.Namespace) -> argparse.Namespace:
    """The same detector and precision with no pretext task and no method: the plain detection step,
    whose backbone trains and whose matcher weighs classes as the model's defaults say unless the
    command line set them (a method may have frozen the backbone or dropped the class cost)."""
    defaults = {key: MODEL_DEFAULTS[args.model][key] for key in ("lr_backbone", "set_cost_class")
                if key not in args.given}
    return argparse.Namespace(**{**vars(args), **defaults, "ssl_task": "none", "ssl_mode": "multitask",
                                 "ssl_method": "none", "query_patches": False, "ssl_backbone_grad": True,
                                 "ssl_levels": False, "num_classes": None})


def pseudo_box_batch(samples: NestedTensor, targets: list[dict], views: int) -> tuple[NestedTensor, list[dict]]:
    """The batch of a pseudo-box method: the sample's real boxes as class-agnostic pseudo-boxes
    (``proposal_ids`` in file order) and, for two views, the batch followed by its mirror image."""
    pseudo = [{**t, "labels": torch.zeros_like(t["labels"]), "proposal_ids": torch.arange(len(t["labels"]),
                                                                                           device=t["labels"].device)}
              for t in targets]
    if views == 1:
        return samples, pseudo
    mirrored = [{**t, "boxes": t["boxes"] * t["boxes"].new_tensor([-1, 1, 1, 1]) + t["boxes"].new_tensor([1, 0, 0, 0])}
                for t in pseudo]
    both = NestedTensor(torch.cat([samples.tensors, samples.tensors.flip(-1)]), torch.cat([samples.mask] * 2))
    return both, [{**t, "view": 0} for t in pseudo] + [{**t, "view": 1} for t in mirrored]


LEVERS: dict[str, Callable[[bool], None]] = {"dropout_kernel": seeded_dropout.set_kernel_enabled,
                                              "fused_adamw": set_fused_on_cpu}


@contextlib.contextmanager
def lever_off(lever: str) -> Iterator[None]:
    """The package's speed lever ``lever`` switched off inside the block."""
    LEVERS[lever](False)
    try:
        yield
    finally:
        LEVERS[lever](True)


def training_step_without(lever: str, args: argparse.Namespace, device: torch.device, samples, targets) -> Step:
    """:func:`training_step`, built (same seed, same weights) and run with ``lever`` off."""
    with lever_off(lever):
        step, parameters = training_step(args, device, samples, targets)

    def run() -> None:
        with lever_off(lever):
            step()
    return run, parameters


def timed(step: Callable[[], None], synchronize: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    synchronize()
    return time.perf_counter() - start


def profile_table(step, synchronize, device: torch.device, steps: int = 2, rows: int = 25) -> str:
    """torch.profiler's op table over ``steps`` steps, by self CPU time, with each op's share of the total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=45)


def main(argv: list[str] | None = None) -> None:
    bench = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--model", default="detr", choices=["detr", "deformable_detr"])
    bench.add_argument("--batch_size", type=int, default=2)
    bench.add_argument("--size", type=int, default=512, help="square input side")
    bench.add_argument("--iters", type=int, default=10, help="timed iterations")
    bench.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--profile", action="store_true",
                       help="after timing, profile 2 more steps and print the ops by self CPU time to stderr")
    bench.add_argument("--overhead", action="store_true",
                       help="also time the step without --ssl_task/--query_patches, alternating, and print the ratio")
    bench.add_argument("--peer", choices=["hf", "official"], default=None,
                       help="also time the same architecture in Hugging Face transformers (hf) or in the official "
                            "checkout at --official_repo (official), alternating, and print our step / theirs")
    bench.add_argument("--official_repo", type=Path, default=None,
                       help="with --peer official: a checkout of facebookresearch/detr (--model detr) or "
                            "fundamentalvision/Deformable-DETR (--model deformable_detr)")
    bench.add_argument("--without", choices=sorted(LEVERS), default=None,
                       help="also time the same step with this speed lever off, alternating, and print "
                            "our step / that step (dropout_kernel: F.dropout instead of the CPU dropout kernel; "
                            "fused_adamw: AdamW's per-tensor loop instead of its fused kernel on a CPU)")
    opts, extra = bench.parse_known_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)

    args = parse_args(["--model", opts.model, "--backbone_weights", "none", "--data_path", str(SAMPLE),
                       "--no-augment", "--device", opts.device, *extra, *pseudo_box_flags(extra)])
    samples, targets = sample_batch(argparse.Namespace(**{**vars(args), "dataset_file": "coco", "data_path": str(SAMPLE),
                                                          "proposals": None}), opts.batch_size, opts.size, device)
    method = METHODS.get(args.ssl_method)
    if method is not None and method.needs_proposals:
        step, parameters = training_step(args, device, *pseudo_box_batch(samples, targets, method.views))
    else:
        step, parameters = training_step(args, device, samples, targets)
    others = {}  # steps timed alternately with ours: the plain detection step, the peer's
    if opts.overhead:
        others["plain"], _ = training_step(without_self_supervision(args), device, samples, targets)
    if opts.without:
        others["without"], _ = training_step_without(opts.without, args, device, samples, targets)
    if opts.peer == "hf":
        others["peer"], peer_parameters = hf_training_step(args, device, samples, targets)
    elif opts.peer == "official":
        if opts.official_repo is None:
            bench.error("--peer official needs --official_repo PATH (an official DETR / Deformable DETR checkout)")
        others["peer"], peer_parameters = official_training_step(args, device, samples, targets, opts.official_repo)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(opts.warmup):
        for run in (step, *others.values()):
            run()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, other_times = [], {name: [] for name in others}
    for _ in range(opts.iters):
        times.append(timed(step, synchronize))
        for name, run in others.items():
            other_times[name].append(timed(run, synchronize))
    seconds = statistics.median(times)
    other_seconds = {name: statistics.median(values) for name, values in other_times.items()}
    if opts.profile:
        print(profile_table(step, synchronize, device), file=sys.stderr)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({
        "benchmark": "train_step", "model": opts.model, "batch_size": opts.batch_size, "size": opts.size,
        "queries": args.num_queries, "ssl_task": args.ssl_task, "ssl_mode": args.ssl_mode,
        "ssl_backbone_grad": args.ssl_backbone_grad, "ssl_method": args.ssl_method, "precision": str(amp_dtype(args, device) or torch.float32).replace("torch.", ""), "device": str(device),
        "s_per_it": round(seconds, 4), "s_per_it_min": round(min(times), 4), "imgs_per_s": round(opts.batch_size / seconds, 3),
        "peak_memory_mb": round(peak / 2**20, 1), "iters": opts.iters,
        **({"plain_s_per_it": round(other_seconds["plain"], 4),
            "overhead": round(seconds / other_seconds["plain"], 3)} if "plain" in others else {}),
        **({"without": opts.without, "without_s_per_it": round(other_seconds["without"], 4),
            "lever_ratio": round(seconds / other_seconds["without"], 3)} if "without" in others else {}),
        "parameters": parameters,
        **({"peer": opts.peer, "peer_s_per_it": round(other_seconds["peer"], 4), "peer_parameters": peer_parameters,
            "ours_over_peer": round(seconds / other_seconds["peer"], 3)} if "peer" in others else {}),
        "backbone": args.backbone,
        "machine": machine_info(gpu=device.type == "cuda"),
        "torch": torch.__version__,
    }, indent=1))


if __name__ == "__main__":
    main()
