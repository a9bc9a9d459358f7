"""Deformable DETR: official state-dict layouts, forward on real images, focal loss, post-processing."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from detr_ssl.config import parse_args
from detr_ssl.engine.amp import autocast, to_float32
from detr_ssl.engine.optim import build_optimizer
from detr_ssl.models import build_model
from detr_ssl.models.criterion import SetCriterion
from detr_ssl.models.deformable_transformer import padding_or_none, sampling_locations
from detr_ssl.models.matcher import HungarianMatcher
from detr_ssl.models.postprocess import PostProcessSigmoid
from detr_ssl.ops import available_backends
from detr_ssl.utils.misc import NestedTensor, nested_tensor_from_tensor_list

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"
INDEX = json.loads((REFERENCE / "index.json").read_text())
VARIANTS = {
    "deformable_detr_r50": [],
    "deformable_detr_r50_box_refine": ["--with_box_refine"],
    "deformable_detr_r50_two_stage": ["--with_box_refine", "--two_stage"],
}
TINY = ["--model", "deformable_detr", "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "64",
        "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "12",
        "--num_feature_levels", "3", "--msda_backend", "pytorch", "--num_classes", "91"]


def read_manifest(name: str) -> list[dict[str, str]]:
    with open(REFERENCE / f"{name}.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def shape_of(row: dict[str, str]) -> tuple[int, ...]:
    return tuple(int(d) for d in row["shape"].split("x")) if row["shape"] else ()


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_equals_official_manifest_and_loads_strict(name):
    rows = read_manifest(name)
    model, _, _ = build_model(parse_args(["--model", "deformable_detr", "--backbone_weights", "none", *VARIANTS[name]]))
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {r["key"]: shape_of(r) for r in rows}
    # Shared heads are one tensor under several names, exactly where the official model shares them.
    for row in rows:
        if row["alias_of"]:
            assert state[row["key"]].data_ptr() == state[row["alias_of"]].data_ptr(), row["key"]
    unique = {id(p): p for p in model.parameters()}.values()
    assert sum(p.numel() for p in unique) == INDEX[name]["params"]
    assert sum(p.numel() for p in unique if p.requires_grad) == INDEX[name]["trainable_params"]

    torch.manual_seed(0)
    official = {}
    for row in rows:  # an "official checkpoint": random tensors of the listed shapes, aliases shared
        official[row["key"]] = official[row["alias_of"]] if row["alias_of"] else torch.randn(shape_of(row))
    model.load_state_dict(official, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in official.items())


@pytest.mark.parametrize("flags", [[], ["--with_box_refine"], ["--with_box_refine", "--two_stage"]])
def test_forward_on_real_images_gives_the_official_outputs_and_losses(coco_batch, flags):
    torch.manual_seed(0)
    args = parse_args(TINY + flags)
    model, criterion, postprocessors = build_model(args)
    samples, targets = coco_batch
    outputs = model(samples)
    assert outputs["pred_logits"].shape == (2, 12, 91) and outputs["pred_boxes"].shape == (2, 12, 4)
    assert len(outputs["aux_outputs"]) == 1
    assert ("enc_outputs" in outputs) == ("--two_stage" in flags)
    losses = criterion(outputs, targets)
    expected = {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error", "loss_ce_0"}
    assert expected <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    if "--two_stage" in flags:
        assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses) <= set(criterion.weight_dict) | {
            "class_error", "cardinality_error", "cardinality_error_0", "cardinality_error_enc"}
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    assert model.input_proj[0][0].weight.grad.abs().sum() > 0
    detections = postprocessors["bbox"](outputs, torch.stack([t["orig_size"] for t in targets]))
    assert detections[0]["boxes"].shape == (100, 4)  # --max_dets best (query, class) pairs of 12 x 91


@pytest.mark.parametrize("flags", [[], ["--with_box_refine", "--two_stage"]])
def test_transformer_ignores_padded_tokens(coco_images, flags):
    """Valid ratios and masks make the transformer's outputs independent of padding at every level.

    (The CNN and GroupNorm do see padding, in the official code as here, so the test starts
    from the projected features.)"""
    torch.manual_seed(0)
    model, _, _ = build_model(parse_args(TINY + ["--dropout", "0"] + flags))
    model.eval()
    image = torch.nn.functional.interpolate(coco_images[0][None], size=(160, 208), mode="bilinear")[0]
    srcs, masks, positions = model.multiscale_features(nested_tensor_from_tensor_list([image]))
    padded_srcs, padded_masks, padded_positions = [], [], []
    for src, mask in zip(srcs, masks):
        src = torch.nn.functional.pad(src, (0, 3, 0, 2), value=7.0)  # garbage in the padding
        mask = torch.nn.functional.pad(mask, (0, 3, 0, 2), value=True)
        padded_srcs.append(src)
        padded_masks.append(mask)
        padded_positions.append(model.backbone[1](NestedTensor(src, mask)))

    def decode(srcs, masks, positions):
        memory, flat = model.transformer.encode(srcs, masks, positions)
        query = None if model.two_stage else model.query_embed.weight
        return model.transformer.decode(memory, flat, query)

    with torch.no_grad():
        plain, padded = decode(srcs, masks, positions), decode(padded_srcs, padded_masks, padded_positions)
    torch.testing.assert_close(padded["hs"], plain["hs"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded["inter_references"], plain["inter_references"], atol=1e-5, rtol=1e-4)


def test_focal_loss_and_cost_against_hand_computed_values():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]]])  # 1 image, 2 queries, 3 classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1]])}]
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal=True)
    prob = torch.sigmoid(logits[0, :, 2])
    positive = 0.25 * (1 - prob) ** 2 * -torch.log(prob + 1e-8)
    negative = 0.75 * prob**2 * -torch.log(1 - prob + 1e-8)
    torch.testing.assert_close(matcher.class_cost(logits[0], targets[0]["labels"])[:, 0], positive - negative)
    assert [i.tolist() for i in matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)[0]] == [[1], [0]]

    criterion = SetCriterion(3, matcher, {"loss_ce": 2.0}, focal_alpha=0.25)
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    one_hot = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    p = torch.sigmoid(logits)
    p_t = p * one_hot + (1 - p) * (1 - one_hot)
    alpha_t = 0.25 * one_hot + 0.75 * (1 - one_hot)
    by_hand = (alpha_t * (1 - p_t) ** 2 * -torch.log(p_t)).sum() / 1  # one target box
    torch.testing.assert_close(losses["loss_ce"], by_hand)
    torch.testing.assert_close(losses["loss_ce"], sigmoid_focal_loss(logits, one_hot, reduction="sum"))
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)


def test_postprocess_takes_the_best_query_class_pairs():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 1, 2], logits[0, 1, 3], logits[0, 0, 0] = 5.0, 4.0, 3.0  # query 1 is two classes
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]]])
    out = PostProcessSigmoid(num_select=3)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    assert out["labels"].tolist() == [2, 3, 0]
    torch.testing.assert_close(out["boxes"][0], torch.tensor([0.0, 0.0, 100.0, 50.0]))
    torch.testing.assert_close(out["boxes"][2], torch.tensor([0.0, 0.0, 200.0, 100.0]))
    torch.testing.assert_close(out["scores"], torch.sigmoid(torch.tensor([5.0, 4.0, 3.0])))


def test_optimizer_groups_follow_official_deformable_detr():
    args = parse_args(TINY + ["--with_box_refine", "--backbone_norm", "batch"])
    model, _, _ = build_model(args)
    optimizer = build_optimizer(model, args)
    rest, backbone, linear_proj = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.0") for p in backbone["params"]) and backbone["lr"] == 2e-5
    assert all(any(k in names[id(p)] for k in ("sampling_offsets", "reference_points")) for p in linear_proj["params"])
    assert linear_proj["lr"] == pytest.approx(2e-4 * 0.1) and rest["lr"] == 2e-4
    assert len(rest["params"]) + len(backbone["params"]) + len(linear_proj["params"]) == len(names)


@pytest.mark.parametrize("flags, message", [
    (["--two_stage"], "--two_stage needs --with_box_refine"),
    (["--pre_norm"], "post-norm only"),
    (["--hidden_dim", "48", "--nheads", "4"], "multiple of 32"),
])
def test_impossible_deformable_options_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args(TINY + flags)
    assert message in capsys.readouterr().err


def test_box_refine_is_refused_for_detr(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--with_box_refine"])
    assert "Deformable DETR options" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
def test_amp_loss_is_close_to_float32_loss(coco_batch, backend):
    """bfloat16 autocast on the CPU (the op runs where its kernel supports the dtype) stays near float32."""
    if backend not in available_backends():
        pytest.skip(f"{backend} back end not available")
    torch.manual_seed(0)
    args = parse_args(TINY + ["--dropout", "0", "--amp", "--amp_dtype", "bfloat16", "--msda_backend", backend])
    model, criterion, _ = build_model(args)
    model.eval()
    samples, targets = coco_batch

    def total_loss(amp: bool) -> float:
        args.amp = amp
        with torch.no_grad(), autocast(args, "cpu"):
            outputs = model(samples)
        losses = criterion(to_float32(outputs), targets)
        return sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).item()

    full, mixed = total_loss(False), total_loss(True)
    assert mixed == pytest.approx(full, rel=0.02)


def test_two_stage_with_more_queries_than_encoder_tokens_says_what_to_change(coco_images):
    args = parse_args([*TINY, "--with_box_refine", "--two_stage", "--num_queries", "900"])
    model, _, _ = build_model(args)
    small = torch.nn.functional.interpolate(coco_images[0][None], size=(96, 128))[0]  # 252 tokens on 3 levels
    with pytest.raises(ValueError, match=r"picks 900 proposals .* give only \d+: use larger images"):
        model.eval()([small])


@pytest.mark.parametrize("coordinates", [2, 4])
def test_sampling_locations_follow_the_official_formula(coordinates):
    """Levels of odd sizes (1/W not a power of two): locations and their gradients agree with the
    official expressions to float rounding."""
    torch.manual_seed(0)
    shapes = torch.tensor([[50, 67], [25, 34], [13, 17]])
    offsets = (torch.randn(2, 11, 4, 3, 4, 2) * 3).requires_grad_()
    references = torch.rand(2, 11, 3, coordinates, requires_grad=True)
    if coordinates == 2:
        normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        official = references[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:
        official = (references[:, :, None, :, None, :2]
                    + offsets / 4 * references[:, :, None, :, None, 2:] * 0.5)
    ours = sampling_locations(references, offsets, shapes)
    torch.testing.assert_close(ours, official, rtol=0, atol=5e-7)
    upstream = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (offsets, references), upstream)
    official_grads = torch.autograd.grad(official, (offsets, references), upstream)
    for mine, theirs in zip(ours_grads, official_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="end in 2 or 4 coordinates"):
        sampling_locations(references[..., :1], offsets, shapes)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace: what the ONNX exporter uses
def test_values_are_masked_only_where_something_is_padded():
    unpadded, padded = torch.zeros(2, 30, dtype=torch.bool), torch.zeros(2, 30, dtype=torch.bool)
    padded[1, -3:] = True
    assert padding_or_none(unpadded) is None
    assert padding_or_none(padded) is padded
    assert padding_or_none(None) is None
    traced = torch.jit.trace(lambda mask: padding_or_none(mask).float(), unpadded, check_trace=False)  # kept
    assert traced(padded).sum() == 3
