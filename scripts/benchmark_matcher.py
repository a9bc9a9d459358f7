"""Time the Hungarian matcher and print JSON.

    python scripts/benchmark_matcher.py                  # batch 8, 20 targets per image, 100 and 300 queries
    python scripts/benchmark_matcher.py --iters 200 --targets 50

Two implementations run interleaved in the same process (A, B, A, B, ...), so that load from
other jobs hits both alike: ``ours`` (``detr_ssl.models.matcher.HungarianMatcher``) and
``official`` (the official DETR / Deformable DETR matcher: one batch-wide (B*Q x all targets)
cost matrix, moved to the host and sliced per image). 100 queries use DETR's softmax class cost
(92 logits), 300 queries Deformable DETR's focal cost (91 logits). Logits are seeded normal
draws, boxes are normalised cxcywh with centres in [0.1, 0.9] and sides in [0.02, 0.3].
Both implementations must give the same matches; the script checks it before timing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detr_ssl.models.matcher import HungarianMatcher  # noqa: E402
from detr_ssl.utils.box_ops import cxcywh_to_xyxy  # noqa: E402
from detr_ssl.utils.machine import machine_info  # noqa: E402

COSTS = (1.0, 5.0, 2.0)  # official class / L1 / GIoU weights


@torch.no_grad()
def official_matcher(outputs, targets, focal: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The official matcher's computation (DETR models/matcher.py; focal class cost as Deformable DETR's)."""
    bs, num_queries = outputs["pred_logits"].shape[:2]
    logits = outputs["pred_logits"].flatten(0, 1)
    out_prob = logits.sigmoid() if focal else logits.softmax(-1)
    out_bbox = outputs["pred_boxes"].flatten(0, 1)
    tgt_ids = torch.cat([v["labels"] for v in targets])
    tgt_bbox = torch.cat([v["boxes"] for v in targets])
    if focal:
        alpha, gamma = 0.25, 2.0
        neg = (1 - alpha) * (out_prob**gamma) * (-(1 - out_prob + 1e-8).log())
        pos = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
        cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
    else:
        cost_class = -out_prob[:, tgt_ids]
    cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    cost_giou = -generalized_box_iou(cxcywh_to_xyxy(out_bbox), cxcywh_to_xyxy(tgt_bbox))
    cost = COSTS[1] * cost_bbox + COSTS[0] * cost_class + COSTS[2] * cost_giou
    cost = cost.view(bs, num_queries, -1).cpu()
    sizes = [len(v["boxes"]) for v in targets]
    indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def random_boxes(n: int, generator: torch.Generator, *lead: int) -> torch.Tensor:
    centre = torch.rand(*lead, n, 2, generator=generator) * 0.8 + 0.1
    size = torch.rand(*lead, n, 2, generator=generator) * 0.28 + 0.02
    return torch.cat([centre, size], dim=-1)


def make_inputs(batch: int, queries: int, num_targets: int, num_logits: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(batch, queries, num_logits, generator=generator) * 2,
               "pred_boxes": random_boxes(queries, generator, batch)}
    targets = [{"labels": torch.randint(0, num_logits - 1, (num_targets,), generator=generator),
                "boxes": random_boxes(num_targets, generator)} for _ in range(batch)]
    return outputs, targets


def bench_shape(batch: int, queries: int, num_targets: int, focal: bool, opts: argparse.Namespace) -> dict:
    num_logits = 91 if focal else 92
    outputs, targets = make_inputs(batch, queries, num_targets, num_logits, opts.seed)
    ours = HungarianMatcher(*COSTS, focal=focal)
    runs = {"ours": lambda: ours(outputs, targets), "official": lambda: official_matcher(outputs, targets, focal)}
    a, b = runs["ours"](), runs["official"]()
    same = all(torch.equal(ra, rb) and torch.equal(ca, cb) for (ra, ca), (rb, cb) in zip(a, b))
    for _ in range(opts.warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for _ in range(opts.iters):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"batch": batch, "queries": queries, "targets_per_image": num_targets,
            "class_cost": "focal" if focal else "softmax", "same_matches": same,
            "ours_ms": round(ms["ours"], 3), "official_style_ms": round(ms["official"], 3),
            "ours_over_official_style": round(ms["ours"] / ms["official"], 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--targets", type=int, default=20, help="ground-truth boxes per image")
    parser.add_argument("--iters", type=int, default=100, help="timed runs of each implementation")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    results = [bench_shape(opts.batch_size, 100, opts.targets, False, opts),
               bench_shape(opts.batch_size, 300, opts.targets, True, opts)]
    print(json.dumps({
        "benchmark": "hungarian_matcher", "results": results, "iters": opts.iters,
        "machine": machine_info(),
        "torch": torch.__version__,
    }, indent=1))


if __name__ == "__main__":
    main()
