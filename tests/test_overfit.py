"""DETR can memorise two real images: the weighted loss falls by a stated factor."""
from __future__ import annotations

from pathlib import Path

import torch

from detr_ssl.config import parse_args
from detr_ssl.data import build_dataset, collate_fn
from detr_ssl.engine.optim import build_optimizer
from detr_ssl.engine.train import weighted_loss
from detr_ssl.models import build_model

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
STEPS = 80
REQUIRED_FALL = 4.0  # final loss at most a quarter of the first (measured here: 23.6 -> 2.6, a factor 9)


def test_detr_overfits_two_sample_images():
    torch.manual_seed(0)
    args = parse_args([
        "--data_path", str(SAMPLE), "--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none",
        "--backbone_norm", "batch", "--hidden_dim", "128", "--enc_layers", "2", "--dec_layers", "2",
        "--dim_feedforward", "512", "--num_queries", "20", "--dropout", "0", "--lr", "2e-4", "--lr_backbone", "2e-4",
        "--min_size", "224", "--max_size", "320", "--no-augment",
    ])
    args.num_classes = 91
    dataset = build_dataset("train", args)
    samples, targets = collate_fn([dataset[0], dataset[1]])
    model, criterion, _ = build_model(args)
    optimizer = build_optimizer(model, args)
    model.train()

    losses = []
    for _ in range(STEPS):
        loss = weighted_loss(criterion(model(samples), targets), criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()
        losses.append(loss.item())

    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < first / REQUIRED_FALL, f"loss fell only from {first:.3f} to {last:.3f} in {STEPS} steps"
