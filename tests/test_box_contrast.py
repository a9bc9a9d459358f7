"""Box-domain contrastive pre-training (AlignDet, PreDet positives): flags and configs, positives,
the loss, the momentum copy, training on real photos, and the --pretrain round trip."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_convert

from detr_ssl.config import parse_args
from detr_ssl.data.folder import ImageFolder
from detr_ssl.data.proposals import ProposalSettings, load_proposals, propose, proposals_json
from detr_ssl.data.views import TwoViews, build_view_transforms, collate_views
from detr_ssl.engine.checkpoint import load_pretrained_encoder
from detr_ssl.engine.optim import build_optimizer
from detr_ssl.engine.train import weighted_loss
from detr_ssl.methods import method_of_state
from detr_ssl.methods.box_contrast import BoxContrast, MatchedQueries, info_nce
from detr_ssl.models import build_model
from test_ssl_cli import DEFORMABLE, SAMPLE, TINY, seeded_training_setup

REPO_ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("chelsea.png", "coffee.png")  # real unlabelled photos of data/sample/unlabelled
NUM_BOXES = 6  # pseudo-boxes per photo, fewer than TINY's 10 queries


def method_flags(proposals: Path, *extra: str) -> list[str]:
    return ["--ssl_method", "box_contrast", "--ssl_mode", "pretrain", "--dataset_file", "folder",
            "--proposals", str(proposals), *extra]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of two real photos and a proposals json for it (random pseudo-boxes, the format of
    scripts/propose_boxes.py)."""
    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(SAMPLE / "unlabelled" / name, root / name)
    settings = ProposalSettings(method="random", top_k=NUM_BOXES, min_size=40)
    records = [propose((index, str(root / name), name), settings) for index, name in enumerate(sorted(PHOTOS))]
    proposals = root.parent / f"{root.name}_proposals.json"
    proposals.write_text(json.dumps(proposals_json(settings, records)))
    return root, proposals


@pytest.fixture(scope="module")
def view_batch(photo_folder):
    """Both photos as a two-view batch, through the data pipeline (ImageFolder + TwoViews)."""
    root, proposals = photo_folder
    torch.manual_seed(0)
    dataset = TwoViews(ImageFolder(root, proposals=load_proposals(proposals, root)), build_view_transforms(128, 192))
    return collate_views([dataset[0], dataset[1]])


def build(photo_folder, *flags: str):
    torch.manual_seed(0)
    args = parse_args([*TINY, *method_flags(photo_folder[1], *flags)])
    model, criterion, _ = build_model(args)
    return args, model, criterion


# --- flags and configs ---------------------------------------------------------------------------

def test_flags_defaults_and_what_the_method_configures(photo_folder):
    args = parse_args([*TINY, "--ssl_task", "box_contrast", "--ssl_mode", "pretrain", "--dataset_file", "folder",
                       "--proposals", str(photo_folder[1])])
    assert (args.ssl_method, args.ssl_task) == ("box_contrast", "none")
    assert (args.box_contrast_temperature, args.box_contrast_momentum, args.box_contrast_loss_coef) == (0.5, 0.996, 1.0)
    assert (args.box_contrast_positive, args.positive_iou) == ("proposal", 0.5)
    assert args.lr_backbone == 0.0 and args.set_cost_class == 0.0  # frozen backbone, matching on boxes only
    given = parse_args([*TINY, *method_flags(photo_folder[1], "--lr_backbone", "1e-5", "--set_cost_class", "1",
                                             "--box_contrast_positive", "overlap", "--positive_iou", "0.7")])
    assert (given.lr_backbone, given.set_cost_class) == (1e-5, 1)
    assert (given.box_contrast_positive, given.positive_iou) == ("overlap", 0.7)


@pytest.mark.parametrize("flags, message", [
    ([], "--ssl_method box_contrast learns from pseudo-boxes: pass --proposals FILE (scripts/propose_boxes.py)"),
    (["--box_contrast_temperature", "0"], "--box_contrast_temperature must be > 0"),
    (["--box_contrast_momentum", "1"], "--box_contrast_momentum must be in [0, 1)"),
    (["--box_contrast_loss_coef", "-1"], "--box_contrast_loss_coef must be >= 0"),
    (["--positive_iou", "0"], "--positive_iou must be in (0, 1]"),
    (["--proposal_top_k", "11"], "--proposal_top_k (11) must be <= --num_queries (10)"),
    (["--box_contrast_positive", "iou"], "--box_contrast_positive"),
])
def test_bad_flags_are_refused_by_name(capsys, photo_folder, flags, message):
    base = [*TINY, "--ssl_method", "box_contrast", "--ssl_mode", "pretrain", "--dataset_file", "folder"]
    proposals = [] if not flags else ["--proposals", str(photo_folder[1])]
    with pytest.raises(SystemExit):
        parse_args([*base, *proposals, *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("config, model", [("box_contrast_detr_r50.yaml", "detr"),
                                           ("box_contrast_deformable_detr_r50.yaml", "deformable_detr")])
def test_alignment_configs_parse(photo_folder, config, model):
    root, proposals = photo_folder
    args = parse_args(["--config", str(REPO_ROOT / "configs" / "pretrain" / config), "--data_path", str(root),
                       "--proposals", str(proposals)])
    assert (args.model, args.ssl_method, args.ssl_mode) == (model, "box_contrast", "pretrain")
    assert args.lr_backbone == 0.0 and args.set_cost_class == 0.0 and args.box_contrast_temperature == 0.5
    assert args.proposal_top_k < args.num_queries


# --- positives and the loss ----------------------------------------------------------------------

def flipped(box: torch.Tensor) -> torch.Tensor:
    """A normalised xyxy box after a horizontal flip of its image."""
    return torch.stack([1 - box[2], box[1], 1 - box[0], box[3]])


def hand_made_targets() -> list[dict]:
    """Two images x two views of four pseudo-boxes: view 0 lacks box 3, view 1 (flipped) lacks box
    1. IoU: (0, 1) 0.78, (0, 2) 0.33, (1, 2) 0.45; box 3 overlaps none."""
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.15, 0.1, 0.55, 0.5], [0.3, 0.1, 0.7, 0.5], [0.6, 0.6, 0.9, 0.9]])
    targets = []
    for view, ids in ((0, [0, 1, 2]), (1, [0, 2, 3])):
        for _ in range(2):
            xyxy = torch.stack([boxes[i] if view == 0 else flipped(boxes[i]) for i in ids])
            targets.append({"boxes": box_convert(xyxy, "xyxy", "cxcywh"), "proposal_ids": torch.tensor(ids),
                            "labels": torch.zeros(3, dtype=torch.int64), "view": torch.tensor(view)})
    return targets


def matched(images: list[int], views: list[int], proposals: list[int]) -> MatchedQueries:
    return MatchedQueries(torch.zeros(len(images), 4), torch.tensor(images), torch.tensor(views),
                          torch.tensor(proposals))


def method(photo_folder, *flags: str) -> BoxContrast:
    return BoxContrast(parse_args([*TINY, *method_flags(photo_folder[1], *flags)]))


def test_proposal_rule_pairs_the_same_pseudo_box_of_the_same_image_across_views(photo_folder):
    targets = hand_made_targets()
    queries = matched([0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [0, 1, 2, 0, 2])
    keys = matched([0, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 0], [0, 2, 3, 0, 2, 2])
    positive, candidate = method(photo_folder).key_masks(queries, keys, targets, torch.tensor([0, 1, 0, 1]), True)
    assert candidate.tolist() == [[True] * 5 + [False]] * 4 + [[False] * 5 + [True]]
    assert positive.nonzero().tolist() == [[0, 0], [2, 1], [3, 3], [4, 5]]


@pytest.mark.parametrize("threshold, expected", [
    (0.5, [[0, 0], [1, 0], [2, 1], [3, 5]]),
    (0.4, [[0, 0], [1, 0], [1, 1], [2, 1], [3, 4], [3, 5]]),
    (0.3, [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1], [3, 3], [3, 4], [3, 5]]),
])
def test_overlap_rule_takes_pseudo_boxes_overlapping_by_the_threshold(photo_folder, threshold, expected):
    """IoU of the original boxes, read from either view (flips keep it): query 3 (view 1, box 2)
    reaches box 1, which only view 0 holds; box 3 (view 1 only) and box 1 (view 0 only) share no
    view and do not pair; other images never count."""
    targets = hand_made_targets()
    queries = matched([0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 1, 2, 2, 3])
    keys = matched([0, 0, 0, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0, 1], [0, 2, 3, 0, 1, 2, 0])
    rule = method(photo_folder, "--box_contrast_positive", "overlap", "--positive_iou", str(threshold))
    positive, _ = rule.key_masks(queries, keys, targets, torch.tensor([0, 1, 0, 1]), True)
    assert positive.nonzero().tolist() == expected


def one_hot_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings one-hot per (image, pseudo-box) for 2 images x 2 views x 4 boxes, and the
    proposal-rule masks: one positive per query, 7 negatives."""
    images, views, boxes = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(4), indexing="ij")
    images, views, boxes = images.flatten(), views.flatten(), boxes.flatten()
    embeddings = torch.nn.functional.one_hot(images * 4 + boxes, 16).float()
    candidate = views[:, None] != views[None, :]
    positive = candidate & (images[:, None] == images[None, :]) & (boxes[:, None] == boxes[None, :])
    return embeddings, positive, candidate


def test_contrast_loss_tends_to_its_bound_for_matching_embeddings_and_grows_when_shuffled():
    embeddings, positive, candidate = one_hot_case()
    losses = [info_nce(embeddings, embeddings, positive, candidate, tau)[0].item() for tau in (1.0, 0.5, 0.1, 0.02)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 1e-12
    torch.testing.assert_close(torch.tensor(losses[1]), torch.log1p(7 * torch.exp(torch.tensor(-2.0))))
    loss, accuracy = info_nce(embeddings, embeddings, positive, candidate, 0.5)
    assert accuracy == 100
    shuffled = embeddings[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    assert info_nce(embeddings, shuffled, positive, candidate, 0.5)[0] > loss + 1


def test_contrast_loss_averages_pairs_skips_queries_without_positive_and_stays_finite():
    embeddings, positive, candidate = one_hot_case()
    queries = embeddings.clone().requires_grad_()
    candidate[0] = positive[0]  # query 0 has no negative: its pair costs log(1) = 0
    positive[1] = False  # query 1 has no positive: skipped
    loss, accuracy = info_nce(queries, embeddings, positive, candidate, 0.5)
    loss.backward()
    assert torch.isfinite(queries.grad).all()
    torch.testing.assert_close(loss, torch.log1p(7 * torch.exp(torch.tensor(-2.0))) * 14 / 15)
    assert accuracy == 100
    empty = info_nce(queries[:0], embeddings, positive[:0], candidate[:0], 0.5)
    assert empty[0].item() == 0 and empty[0].requires_grad


def test_exact_pseudo_boxes_cost_nothing_and_matching_ignores_the_classifier(photo_folder, view_batch):
    """Predicted boxes equal to the pseudo-boxes (on queries whose classifier says 'no object') and
    embeddings one-hot per pseudo-box: box losses 0, contrast near its bound 0."""
    args, _, criterion = build(photo_folder, "--box_contrast_temperature", "0.02")
    _, targets = view_batch
    num_images, num_queries = len(targets), 10
    generator = torch.Generator().manual_seed(0)
    boxes = torch.rand(num_images, num_queries, 4, generator=generator) * 0.5 + 0.25
    logits = torch.zeros(num_images, num_queries, 2)
    embeddings = torch.zeros(num_images, num_queries, 64)
    for slot, target in enumerate(targets):
        queries = torch.arange(num_queries - 1, num_queries - 1 - len(target["boxes"]), -1)  # last queries, reversed
        boxes[slot, queries] = target["boxes"]
        logits[slot, queries, 1] = 10.0  # confidently 'no object'
        embeddings[slot, queries, (slot % 2) * NUM_BOXES + target["proposal_ids"]] = 1.0
    outputs = {"pred_logits": logits, "pred_boxes": boxes,
               "contrast": {"online": embeddings, "momentum": embeddings, "momentum_boxes": boxes,
                            "momentum_logits": logits}}
    losses = criterion(outputs, targets)
    assert losses["loss_bbox"] < 1e-6 and losses["loss_giou"] < 1e-6
    assert losses["loss_contrast"] < 1e-6 and losses["contrast_accuracy"] == 100
    weights = criterion.weight_dict
    assert weights["loss_ce"] == 0 and weights["loss_contrast"] == args.box_contrast_loss_coef


# --- the momentum copy ---------------------------------------------------------------------------

@pytest.mark.parametrize("model_flags, backbone", [([], "frozen"), ([], "trained"),
                                                   ([*DEFORMABLE, "--with_box_refine"], "frozen")],
                         ids=["detr-frozen", "detr-trained", "deformable_detr-frozen"])
def test_momentum_copy_gets_no_gradient_is_not_optimised_and_follows_by_ema(photo_folder, view_batch, model_flags,
                                                                            backbone):
    args, model, criterion = build(photo_folder, *model_flags,
                                   *(["--lr_backbone", "1e-4"] if backbone == "trained" else []))
    momentum = model.contrast_momentum
    keys = model.state_dict()
    copied_backbone = {k for k in keys if k.startswith("contrast_momentum.detector.backbone.")}
    if backbone == "frozen":
        assert not copied_backbone  # the momentum pass borrows the online backbone
    else:
        assert copied_backbone == {"contrast_momentum.detector." + k for k in keys if k.startswith("backbone.")}
    assert not any(p.requires_grad for p in momentum.parameters())
    model.train()
    assert model.training and not any(m.training for m in momentum.modules())
    optimizer = build_optimizer(model, args)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in momentum.parameters()}
    assert {id(p) for p in model.contrast_projection.parameters()} <= optimised

    calls = []
    model.backbone[0].register_forward_hook(lambda *_: calls.append("online"))
    if backbone == "trained":
        momentum.detector.backbone[0].register_forward_hook(lambda *_: calls.append("momentum"))
    samples, targets = view_batch
    outputs = model(samples)
    assert calls == (["online"] if backbone == "frozen" else ["online", "momentum"])
    contrast = outputs["contrast"]
    assert contrast["online"].shape == contrast["momentum"].shape == (len(targets), 10, 64)
    assert contrast["momentum_boxes"].shape == (len(targets), 10, 4) and not contrast["momentum"].requires_grad
    losses = criterion(outputs, targets)
    weighted_loss(losses, criterion.weight_dict).backward()
    assert all(p.grad is None for p in momentum.parameters())
    assert all(p.grad is not None for p in model.contrast_projection.parameters())

    with torch.no_grad():  # online weights far from the copy's, so that a wrong pairing would show
        for name, parameter in model.named_parameters():
            if not name.startswith("contrast_momentum."):
                parameter.add_(torch.randn_like(parameter))
    online, before = model.state_dict(), {k: v.clone() for k, v in momentum.state_dict().items()}
    model.after_optimizer_step()
    mu = args.box_contrast_momentum
    for name, after in momentum.state_dict().items():
        source = online[name.replace("detector.", "", 1) if name.startswith("detector.") else
                        name.replace("projection.", "contrast_projection.", 1)]
        if name.startswith("detector.query_embed.") or not after.is_floating_point():
            assert torch.equal(after, source), name  # copied, as AlignDet
        else:
            torch.testing.assert_close(after - before[name], (1 - mu) * (source - before[name]), msg=name)


def test_pictures_and_a_batch_of_single_views(photo_folder, view_batch):
    _, model, criterion = build(photo_folder)
    samples, targets = view_batch
    model.train()
    outputs = model(samples)
    (tag, picture, rows), = model.pictures(outputs, targets)
    half = len(targets) // 2
    (h0, w0), (h1, w1) = targets[0]["size"].tolist(), targets[half]["size"].tolist()
    assert (tag, rows, picture.shape) == ("ssl/box_contrast_views", 1, (1, 3, max(h0, h1), w0 + 8 + w1))
    assert 0 <= picture.min() and picture.max() <= 1
    single = [{k: v for k, v in target.items() if k != "view"} for target in targets[:half]]  # held-out images
    one_view = model(type(samples)(samples.tensors[:half], samples.mask[:half]))
    losses = criterion(one_view, single)
    assert torch.isfinite(losses["loss_contrast"]) and losses["loss_contrast"] > 0
    no_boxes = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "size": t["size"]}
                for t in single]  # held-out images without --val_proposals
    assert criterion(one_view, no_boxes)["loss_contrast"] == 0


# --- training and the --pretrain round trip ------------------------------------------------------

@pytest.mark.parametrize("model_flags, rule", [([], "proposal"), ([], "overlap"), (DEFORMABLE, "proposal")],
                         ids=["detr-proposal", "detr-overlap", "deformable_detr-proposal"])
def test_box_contrast_losses_fall_on_real_photos(photo_folder, view_batch, model_flags, rule):
    """A fixed two-view batch; momentum 0.9, so that the keys move within the 20 steps."""
    model, criterion, optimizer = seeded_training_setup(
        [*model_flags, *method_flags(photo_folder[1], "--box_contrast_positive", rule, "--positive_iou", "0.3",
                                     "--box_contrast_momentum", "0.9")])
    samples, targets = view_batch
    contrast, total = [], []
    for _ in range(20):
        losses = criterion(model(samples), targets)
        loss = weighted_loss(losses, criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_optimizer_step()
        contrast.append(losses["loss_contrast"].item())
        total.append(loss.item())
    assert sum(contrast[-5:]) < 0.8 * sum(contrast[:5]), contrast
    assert sum(total[-5:]) < 0.85 * sum(total[:5]), total


def test_pretrain_checkpoint_hands_on_decoder_queries_and_box_head(tmp_path, photo_folder):
    _, model, _ = build(photo_folder)
    state = model.state_dict()
    torch.save({"model": state}, tmp_path / "pre.pth")
    assert method_of_state(state) is BoxContrast
    assert not any(k.startswith(("class_embed.", "contrast_")) for k in BoxContrast.pretrained_part(state))
    detector, _, _ = build_model(parse_args([*TINY, "--num_classes", "3"]))
    report = load_pretrained_encoder(detector, tmp_path / "pre.pth", logging.getLogger("test"))
    loaded = detector.state_dict()
    for key in ("transformer.decoder.layers.0.linear1.weight", "query_embed.weight", "bbox_embed.layers.2.weight",
                "input_proj.weight", "transformer.encoder.layers.0.linear1.weight"):
        assert key in report.loaded and torch.equal(loaded[key], state[key]), key
    assert not any(k.startswith(("class_embed.", "contrast_")) for k in report.loaded)
    assert set(report.missing) == {"class_embed.weight", "class_embed.bias"}
