"""Checkpoints: atomic saving, safe loading, RNG round-trips, head re-initialisation, rotation."""
from __future__ import annotations

import argparse
import logging
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from detr_ssl.engine import checkpoint as ckpt
from detr_ssl.engine.checkpoint import (
    CheckpointMismatchError,
    NotACheckpointError,
    UnsafeCheckpointError,
    build_checkpoint_state,
    capture_rng_state,
    load_checkpoint,
    load_finetune,
    load_for_evaluation,
    load_model_state,
    restore_rng_state,
    resume_training,
    rotate_checkpoints,
    save_checkpoint,
    save_epoch_checkpoint,
)

LOGGER = logging.getLogger("test_checkpoint")


class TinyDetector(nn.Module):
    """Stand-in with the official head names: a backbone, a class head and a box head."""

    def __init__(self, num_classes: int = 91) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 8)
        self.class_embed = nn.Linear(8, num_classes + 1)
        self.bbox_embed = nn.Linear(8, 4)


def _training_state(model: nn.Module, epoch: int = 3) -> tuple[dict, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    scheduler.step()
    args = argparse.Namespace(lr=1e-4, output_dir="runs/x", limit_train_batches=None, aux_loss=True)
    return build_checkpoint_state(model, optimizer, scheduler, epoch, args), optimizer, scheduler


class _CreatesFile:
    """A pickle payload: unpickling it opens (creates) ``path`` for writing."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def torch_save_dies_midway(obj, file):
        file.write(b"PK\x03\x04 half a zip archive")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", torch_save_dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()

    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"], "temporary file left behind"


def _draw() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.randn()  # and in NumPy's
    save_checkpoint(tmp_path / "rng.pth", {"rng_state": capture_rng_state()})
    expected = _draw()
    assert _draw() != expected  # the generators moved on
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng_state"])
    assert _draw() == expected


def test_our_checkpoint_loads_weights_only(tmp_path):
    model = TinyDetector()
    state, _, _ = _training_state(model)
    save_checkpoint(tmp_path / "checkpoint.pth", state)

    loaded = torch.load(tmp_path / "checkpoint.pth", weights_only=True)  # no allow-list needed
    assert set(loaded) == {"model", "optimizer", "lr_scheduler", "epoch", "args", "rng_state"}
    assert loaded["args"]["output_dir"] == "runs/x" and loaded["epoch"] == 3
    assert len(loaded["rng_state"]) == 1  # one per process
    for key, value in model.state_dict().items():
        assert torch.equal(load_checkpoint(tmp_path / "checkpoint.pth")["model"][key], value)


def test_official_checkpoint_with_namespace_args_loads(tmp_path):
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": TinyDetector().state_dict(), "args": argparse.Namespace(lr=1e-4, dataset_file="coco")}, path)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses the Namespace
        torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].dataset_file == "coco"


def test_code_executing_pickle_is_refused_and_not_run(tmp_path):
    control = tmp_path / "control_created"
    pickle.loads(pickle.dumps(_CreatesFile(control))).close()
    assert control.exists(), "the payload must be live for this test to mean anything"

    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _CreatesFile(target)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*refused.*unsafe.*not executed"):
        load_checkpoint(path)
    assert not target.exists()


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


def test_other_class_count_reinitialises_the_head_by_name(caplog):
    source, target = TinyDetector(num_classes=91), TinyDetector(num_classes=15)
    fresh_head = target.class_embed.weight.detach().clone()
    state = source.state_dict()
    state["ssl_head.weight"] = torch.zeros(2)
    del state["bbox_embed.bias"]

    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        report = load_model_state(target, state, LOGGER)

    assert sorted(report.reinitialised) == ["class_embed.bias", "class_embed.weight"]
    assert report.missing == ["bbox_embed.bias"] and report.unexpected == ["ssl_head.weight"]
    assert sorted(report.loaded) == ["backbone.bias", "backbone.weight", "bbox_embed.weight"]
    assert not report.exact
    assert torch.equal(target.class_embed.weight, fresh_head)
    assert torch.equal(target.backbone.weight, source.backbone.weight)
    assert "class_embed.weight re-initialised (checkpoint 92x8, model 16x8)" in caplog.text
    assert "class_embed.bias re-initialised (checkpoint 92, model 16)" in caplog.text
    assert "bbox_embed.bias" in caplog.text and "ssl_head.weight" in caplog.text

    with pytest.raises(CheckpointMismatchError, match=r"class_embed\.weight \(checkpoint 92x8, model 16x8\)"):
        load_model_state(TinyDetector(num_classes=15), state, LOGGER, strict=True)


def test_matching_state_loads_exactly():
    source, target = TinyDetector(), TinyDetector()
    report = load_model_state(target, source.state_dict(), LOGGER, strict=True)
    assert report.exact and len(report.loaded) == 6
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters()))


def test_resume_restores_optimizer_and_epoch_of_an_exact_match(tmp_path):
    state, optimizer, scheduler = _training_state(TinyDetector(), epoch=4)
    save_checkpoint(tmp_path / "checkpoint.pth", state)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pth")

    model = TinyDetector()
    new_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    new_scheduler = torch.optim.lr_scheduler.StepLR(new_optimizer, step_size=2)
    assert resume_training(checkpoint, model, new_optimizer, new_scheduler, LOGGER) == 5
    assert new_scheduler.last_epoch == scheduler.last_epoch
    assert new_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]



def test_resume_of_a_checkpoint_that_does_not_fit_stops_naming_the_keys(tmp_path):
    state, _, _ = _training_state(TinyDetector(), epoch=4)
    state["model"]["ssl_head.weight"] = torch.zeros(2)
    del state["model"]["bbox_embed.bias"]
    other = TinyDetector(num_classes=15)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    optimizer = torch.optim.AdamW(other.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)

    with pytest.raises(CheckpointMismatchError) as err:
        resume_training(state, other, optimizer, scheduler, LOGGER, "run/checkpoint.pth")
    message = str(err.value)
    assert "--resume run/checkpoint.pth" in message and "--finetune" in message
    assert "class_embed.weight (checkpoint 92x8, model 16x8)" in message
    assert "missing in the checkpoint: bbox_embed.bias" in message and "not in the model: ssl_head.weight" in message
    assert optimizer.state_dict()["state"] == {}  # nothing was taken over
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_resume_of_weights_only_is_refused_with_the_flag_that_starts_from_them():
    model = TinyDetector()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    with pytest.raises(NotACheckpointError, match=r"no training state \(optimizer, lr_scheduler, epoch missing\).*"
                                                  r"--finetune detr-r50\.pth"):
        resume_training({"model": TinyDetector().state_dict()}, model, optimizer, scheduler, LOGGER, "detr-r50.pth")


def test_evaluation_load_is_strict_but_ignores_pretext_heads(caplog):
    source = TinyDetector()
    state = {**source.state_dict(), "ssl_head.weight": torch.zeros(2), "patch2query.weight": torch.zeros(2)}
    target = TinyDetector()
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        report = load_for_evaluation(target, {"model": state}, "ckpt.pth", LOGGER)
    assert report.exact and torch.equal(target.class_embed.weight, source.class_embed.weight)
    assert "ssl_head.weight" in caplog.text and "patch2query.weight" in caplog.text

    with pytest.raises(CheckpointMismatchError, match=r"ckpt\.pth: .*class_embed\.weight.*see the flags"):
        load_for_evaluation(TinyDetector(num_classes=15), {"model": state}, "ckpt.pth", LOGGER, hint="; see the flags")
    del state["bbox_embed.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing in the checkpoint: bbox_embed\.bias"):
        load_for_evaluation(TinyDetector(), {"model": state}, "ckpt.pth", LOGGER)
    state["backbone.extra"] = torch.zeros(1)  # unexpected outside the pretext heads
    with pytest.raises(CheckpointMismatchError, match=r"not in the model: backbone\.extra"):
        load_for_evaluation(TinyDetector(), {"model": {**source.state_dict(), "backbone.extra": torch.zeros(1)}},
                            "ckpt.pth", LOGGER)


def test_finetune_loads_what_fits_and_lists_loaded_skipped_and_new_keys_by_module(tmp_path, caplog):
    source = TinyDetector(num_classes=91)
    state, _, _ = _training_state(source)
    save_checkpoint(tmp_path / "coco.pth", state)
    target = TinyDetector(num_classes=15)
    fresh_head = target.class_embed.weight.detach().clone()
    with caplog.at_level(logging.DEBUG, logger=LOGGER.name):
        report = load_finetune(target, tmp_path / "coco.pth", LOGGER)
    assert sorted(report.loaded) == ["backbone.bias", "backbone.weight", "bbox_embed.bias", "bbox_embed.weight"]
    assert torch.equal(target.backbone.weight, source.backbone.weight)
    assert torch.equal(target.class_embed.weight, fresh_head)
    assert "loaded 4 tensors: backbone.* (2 tensors), bbox_embed.* (2 tensors)" in caplog.text
    assert "skipped (in the checkpoint, not loaded) 2 tensors: class_embed.* (2 tensors)" in caplog.text
    assert "newly initialised 2 tensors: class_embed.* (2 tensors)" in caplog.text
    assert "class_embed.weight, class_embed.bias" in caplog.text  # the full list at debug level

    with pytest.raises(CheckpointMismatchError, match="no tensor it hands on fits this model"):
        load_finetune(nn.Sequential(nn.Linear(2, 2)), tmp_path / "coco.pth", LOGGER)


def test_summarize_keys_groups_by_module_prefix():
    keys = [f"transformer.decoder.layers.{i}.w" for i in range(3)] + ["query_embed.weight", "level_embed",
                                                                        "class_embed.weight", "class_embed.bias"]
    assert ckpt.summarize_keys(keys) == ("transformer.decoder.* (3 tensors), query_embed.weight, level_embed, "
                                         "class_embed.* (2 tensors)")
    assert ckpt.summarize_keys([]) == "none"


def _not_checkpoints(tmp_path, sample_root):
    """Files people pass as checkpoints by mistake, with what the error must call them."""
    image = next((sample_root / "train").glob("*.jpg"))
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 1}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "config.yaml").write_text("model: detr\nepochs: 3\n")
    (tmp_path / "notes.txt").write_text("174812789 is not a checkpoint\n")
    with open(tmp_path / "data.pkl", "wb") as file:
        pickle.dump({"rows": [1, 2, 3]}, file)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    return [(image, "a JPEG image"), (truncated, "truncated or damaged"), (tmp_path / "config.yaml", "a text file"),
            (tmp_path / "notes.txt", "a text file"), (tmp_path / "data.pkl", "a plain pickle, not written by torch.save"),
            (tmp_path / "list.pth", "it holds a list, not a dict"), (tmp_path / "empty.pth", "an empty file")]


def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(tmp_path, sample_root):
    for path, what in _not_checkpoints(tmp_path, sample_root):
        with pytest.raises(NotACheckpointError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert str(path) in message and what in message and "expected a checkpoint" in message, message
        assert "\n" not in message


def test_a_checkpoint_without_model_weights_is_named():
    with pytest.raises(NotACheckpointError, match=r"x\.pth holds no model weights \(its top-level keys: epoch, args\)"):
        ckpt.model_state_of({"epoch": 3, "args": {}}, "x.pth")
    state = TinyDetector().state_dict()
    assert ckpt.model_state_of(state, "bare.pth") is state  # a bare state dict is its own model state


def test_rotation_keeps_latest_and_last_k(tmp_path):
    for epoch in range(5):
        save_epoch_checkpoint(tmp_path, {"epoch": epoch}, keep_last=2)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pth", "checkpoint0003.pth", "checkpoint0004.pth", "notes.txt"
    ]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 4
    # each numbered copy keeps its own epoch after checkpoint.pth was replaced
    assert [load_checkpoint(tmp_path / f"checkpoint000{e}.pth")["epoch"] for e in (3, 4)] == [3, 4]

    rotate_checkpoints(tmp_path, keep_last=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "notes.txt"]
