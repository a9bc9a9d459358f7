"""The README stays true: its CLI reference is `--help`, it lists every config file, and every config builds a\nmodel that runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_script
from detr_ssl.config import parse_args
from detr_ssl.data import CocoDetection, build_transforms, collate_fn
from detr_ssl.methods import METHODS
from detr_ssl.models import build_model
from detr_ssl.utils.misc import NestedTensor

REPO = Path(__file__).resolve().parent.parent
UNLABELLED = REPO / "data" / "sample" / "unlabelled"


def test_readme_cli_reference_equals_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    readme = (REPO / "README.md").read_text()
    assert load_script("update_cli_reference").rendered_readme(readme) == readme, (
        "README.md's CLI reference differs from --help: run python scripts/update_cli_reference.py")


def test_readme_documents_every_config_file():
    readme = (REPO / "README.md").read_text()
    missing = [str(p.relative_to(REPO)) for p in sorted((REPO / "configs").rglob("*.yaml"))
               if f"`{p.relative_to(REPO)}`" not in readme]
    assert not missing, f"config files not described in README.md: {missing}"


CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.fixture(scope="module")
def one_photo() -> tuple[NestedTensor, list[dict]]:
    """One sample photo with its boxes at 256 x 320 px: enough encoder tokens (1,700 over four
    levels) for the dense config's 900 two-stage proposals, small enough for a quick forward."""
    dataset = CocoDetection(REPO / "data" / "sample" / "train", REPO / "data" / "sample" / "annotations" /
                            "instances_train.json", transforms=build_transforms("val", min_size=256, max_size=320))
    return collate_fn([dataset[0]])


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_config_builds_its_model_which_runs_a_training_forward_and_loss(path, one_photo):
    """Each shipped config's model (random weights: nothing is downloaded) takes one real batch in
    training mode, and its criterion gives finite losses: the SSL head, query patches and
    detection heads the config asks for all run."""
    pseudo_boxes = ["--data_path", str(UNLABELLED), "--proposals", str(path)]  # any file: it is not read here
    method = METHODS.get(yaml.safe_load(path.read_text()).get("ssl_method", "none"))
    needs_proposals = method is not None and method.needs_proposals
    args = parse_args(["--config", str(path), "--backbone_weights", "none", "--msda_backend", "pytorch",
                       *(pseudo_boxes if needs_proposals else [])])
    args.num_classes = args.num_classes or 91  # the data would say; 91 covers the sample's COCO ids
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    samples, targets = one_photo
    if needs_proposals:  # the photo's boxes as class-agnostic pseudo-boxes, in two views when asked for
        targets = [{**t, "labels": torch.zeros_like(t["labels"]), "proposal_ids": torch.arange(len(t["labels"])),
                    "view": view} for t in targets for view in range(method.views)]
        samples = NestedTensor(samples.tensors.repeat(method.views, 1, 1, 1), samples.mask.repeat(method.views, 1, 1))
    with torch.no_grad():
        losses = criterion(model.train()(samples), targets)
    assert losses and all(torch.isfinite(v).all() for v in losses.values()), losses
    if args.ssl_task != "none":
        assert "loss_ssl" in losses
    if args.query_patches:
        assert "loss_patch_bbox" in losses
    if args.ssl_mode == "multitask":
        assert "loss_bbox" in losses
