"""scripts/convert_hf.py: tiny DETR and Deformable DETR checkpoints become transformers models
that give our outputs on the sample images, and come back as the very same checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conversion never needs the hub
transformers = pytest.importorskip("transformers", reason="Hugging Face conversion needs the hf extra: "
                                                          "pip install -e '.[hf]'")

from conftest import SAMPLE_ROOT, load_script  # noqa: E402
from detr_ssl import Detector  # noqa: E402
from detr_ssl.models import build_model  # noqa: E402
from test_api import detector_args  # noqa: E402

convert_hf = load_script("convert_hf")
CATEGORIES = {1: "person", 3: "car", 90: "toothbrush"}
TINY = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "64",
        "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "128", "--num_queries", "12",
        "--min_size", "128", "--max_size", "128", "--num_classes", "91"]
DEFORMABLE = ["--model", "deformable_detr", "--num_feature_levels", "3", "--msda_backend", "pytorch"]
VARIANTS = {
    "detr": [],
    "detr_r50_dc5_learned": ["--backbone", "resnet50", "--dilation", "--position_embedding", "learned"],
    "deformable": DEFORMABLE,
    "box_refine": [*DEFORMABLE, "--with_box_refine"],
    "two_stage": [*DEFORMABLE, "--with_box_refine", "--two_stage"],
}
HF_CLASSES = {"detr": "DetrForObjectDetection", "deformable_detr": "DeformableDetrForObjectDetection"}


def block_network(patch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: conversion must not download anything."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    block_network(monkeypatch)


def tiny_checkpoint(path: Path, flags: list[str], extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A detector of TINY ``flags`` whose every weight (zero-initialised heads and the frozen
    BatchNorm statistics too) is randomised, so that any misplaced tensor changes the outputs."""
    args = detector_args([*TINY, *flags])
    torch.manual_seed(0)
    model = build_model(args)[0]
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("running_var"):
                tensor.uniform_(0.8, 1.2)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * (0.01 if name.startswith("backbone.") else 0.05))
    torch.save({"model": {**model.state_dict(), **(extra or {})}, "args": vars(args), "categories": CATEGORIES}, path)
    return path


def convert(capsys, *argv: str) -> tuple[int, dict, str]:
    status = convert_hf.main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return status, json.loads(lines[-1]) if lines else {}, captured.err


def run(*argv: str | Path) -> dict:
    """The summary of a conversion that must succeed, run in this process."""
    args = convert_hf.build_parser().parse_args([str(a) for a in argv])
    summary = convert_hf.to_hf(args) if args.to else convert_hf.from_hf(args)
    assert not summary["refused"], summary
    return summary


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path, Path, dict, dict]]:
    """Per variant: (checkpoint, transformers folder, checkpoint converted back, the summaries of
    the conversion there and back)."""
    root, results = tmp_path_factory.mktemp("hf"), {}
    with pytest.MonkeyPatch.context() as patch:
        block_network(patch)
        for name, flags in VARIANTS.items():
            checkpoint, folder, back = root / f"{name}.pth", root / name, root / f"{name}_back.pth"
            tiny_checkpoint(checkpoint, flags)
            results[name] = (checkpoint, folder, back, run("--to", "hf", checkpoint, folder),
                             run("--from", "hf", folder, back))
    return results


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_ways_give_the_same_outputs_and_the_round_trip_the_same_state(converted, variant):
    checkpoint, folder, back, there, back_again = converted[variant]
    saved = torch.load(checkpoint, weights_only=True)
    model = saved["args"]["model"]
    hf_model, info = getattr(transformers, HF_CLASSES[model]).from_pretrained(
        folder, local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert there["model"] == back_again["model"] == model and there["dropped"] == []
    assert 0 < max(there["max_diff"].values()) <= 1e-4 and 0 < max(back_again["max_diff"].values()) <= 1e-4
    assert there["unmatched_queries"] == back_again["unmatched_queries"] == 0
    assert ("proposal_logits" in there["max_diff"]) == (variant == "two_stage")
    original, returned = saved["model"], torch.load(back, weights_only=True)
    assert sorted(returned["model"]) == sorted(original)
    assert all(torch.equal(returned["model"][key], value) for key, value in original.items())
    assert returned["categories"] == CATEGORIES
    architecture = ("model", "backbone", "hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward",
                    "num_queries", "num_classes", "num_feature_levels", "with_box_refine", "two_stage", "dilation",
                    "position_embedding", "min_size", "max_size")
    assert {key: returned["args"][key] for key in architecture} == {key: saved["args"][key] for key in architecture}


def test_a_second_conversion_replaces_the_folders_files(converted, capsys):
    checkpoint, folder = converted["detr"][:2]
    status, summary, _ = convert(capsys, "--to", "hf", checkpoint, folder)
    assert status == 0 and not summary["refused"] and summary["direction"] == "to_hf"
    assert not list(folder.parent.glob(".*partial"))


def test_id2label_comes_from_the_category_names(converted):
    config = json.loads((converted["deformable"][1] / "config.json").read_text())
    assert len(config["id2label"]) == 91
    assert {int(k): v for k, v in config["id2label"].items() if v != "N/A"} == CATEGORIES
    assert config["label2id"]["car"] == 3
    assert config["backbone_config"]["model_type"] == "timm_backbone"


def test_box_refinement_keeps_one_class_head_per_layer(converted):
    config = json.loads((converted["box_refine"][1] / "config.json").read_text())
    assert config["with_box_refine"] and not config["two_stage"] and config["tie_word_embeddings"] is False
    hf_model = transformers.DeformableDetrForObjectDetection.from_pretrained(converted["box_refine"][1])
    assert not torch.equal(hf_model.class_embed[0].weight, hf_model.class_embed[1].weight)


def test_our_tools_load_the_converted_checkpoint(converted, tmp_path):
    from detr_ssl.__main__ import main

    checkpoint, _, back = converted["detr"][:3]
    image = sorted((SAMPLE_ROOT / "val").glob("*.jpg"))[0]
    found = Detector.from_checkpoint(back).predict(image)
    expected = Detector.from_checkpoint(checkpoint).predict(image)
    assert torch.allclose(found.boxes, expected.boxes, atol=1e-4) and torch.equal(found.labels, expected.labels)
    predict = load_script("predict")
    assert predict.main(["--resume", str(back), "--images", str(image), "--out", str(tmp_path / "p"),
                         "--device", "cpu"]) == 0
    main(["--data_path", str(SAMPLE_ROOT), "--device", "cpu", "--num_workers", "0", "--eval", "--resume", str(back),
          "--output_dir", str(tmp_path / "eval"), "--limit_val_batches", "1", "--no-tensorboard"])
    assert list((tmp_path / "eval").glob("results_*.json"))


def test_pretext_heads_are_dropped_and_named(tmp_path, capsys, caplog):
    heads = {"patch2query.weight": torch.ones(3, 64), "feature_align.bias": torch.zeros(64)}
    checkpoint = tiny_checkpoint(tmp_path / "ssl.pth", ["--ssl_task", "reconstruction"], extra=heads)
    ssl_keys = [k for k in torch.load(checkpoint, weights_only=True)["model"] if k.startswith("ssl_head.")]
    status, summary, _ = convert(capsys, "--to", "hf", checkpoint, tmp_path / "hf")
    assert status == 0 and ssl_keys
    assert sorted(summary["dropped"]) == sorted([*ssl_keys, *heads])
    warning = next(r.getMessage() for r in caplog.records if "not converted" in r.getMessage())
    assert "(transformers has no place for them): ssl_head." in warning and "patch2query.weight" in warning


def test_heads_that_are_one_module_in_ours_must_be_equal(converted, tmp_path, capsys):
    """transformers keeps box refinement's decoder box heads apart from the prediction heads (untied,
    see hf_config); after training there they may differ, and our layout cannot hold both."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hf"
    shutil.copytree(converted["box_refine"][1], folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.decoder.bbox_embed.0.layers.0.bias"] = weights["model.decoder.bbox_embed.0.layers.0.bias"] + 1
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    status, _, err = convert(capsys, "--from", "hf", folder, tmp_path / "back.pth")
    assert status == 1 and "differ here: transformer.decoder.bbox_embed.0.layers.0.bias, bbox_embed.0" in err
    assert not (tmp_path / "back.pth").exists()


@pytest.mark.parametrize(("saved", "named"), [
    ({"backbone": "vit_base_patch16"}, "--backbone vit_base_patch16"),   # ViTDet's pyramid: no HF equivalent
    ({"backbone": "resnet18", "pre_norm": True}, "--pre_norm"),         # HF's DETR layers are post-norm
])
def test_what_transformers_cannot_express_is_refused_naming_the_flag(saved, named, tmp_path, capsys):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"class_embed.weight": torch.zeros(6, 64)}, "args": {"model": "detr", **saved}}, path)
    status, summary, err = convert(capsys, "--to", "hf", path, tmp_path / "hf")
    assert status == 1 and summary == {} and not (tmp_path / "hf").exists()
    assert f"error: {path}: {named}" in err


def test_a_wrong_mapping_is_caught_by_the_output_check(converted, monkeypatch, tmp_path, capsys):
    """Query and key projections swapped: every key still fits, only the outputs tell."""
    monkeypatch.setattr(sys.modules["detr_ssl.hf"], "QKV", ("k", "q", "v"))
    status, summary, err = convert(capsys, "--to", "hf", converted["detr"][0], tmp_path / "hf")
    assert status == 1 and summary["refused"] and max(summary["max_diff"].values()) > 1e-4
    assert "not written" in err and not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())


def test_two_stage_queries_are_compared_proposal_by_proposal():
    """Near-tied proposal scores may put the same queries in another order, or pick another at the
    last place: the queries of the same encoder token are compared, the others counted."""
    scores = torch.tensor([[[0.9], [0.5], [0.7], [0.1]]])            # 4 tokens, top 3: tokens 0, 2, 1
    logits, boxes = torch.randn(1, 3, 2), torch.rand(1, 3, 4)
    order = [2, 0, 1]                                                   # theirs: tokens 1, 0, 2
    theirs_scores = torch.tensor([[[0.9], [0.91], [0.7], [0.1]]])
    ours, theirs, unmatched = convert_hf.same_proposals((logits, boxes, scores),
                                                        (logits[:, order], boxes[:, order], theirs_scores))
    assert unmatched == 0 and torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    theirs_scores = torch.tensor([[[0.9], [0.5], [0.7], [0.6]]])       # token 3 instead of token 1
    ours, theirs, unmatched = convert_hf.same_proposals((logits, boxes, scores), (logits, boxes, theirs_scores))
    assert unmatched == 1 and ours[0].shape == (2, 2) and torch.equal(ours[0], theirs[0])


def test_a_difference_above_the_tolerance_writes_no_file(converted, tmp_path, capsys):
    status, summary, _ = convert(capsys, "--from", "hf", converted["deformable"][1], tmp_path / "back.pth",
                                 "--tolerance", "0")
    assert status == 1 and summary["refused"] and not list(tmp_path.iterdir())


def test_missing_transformers_names_the_extra(converted, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    status, _, err = convert(capsys, "--to", "hf", converted["detr"][0], tmp_path / "hf")
    assert status == 1 and "pip install -e '.[hf]'" in err
