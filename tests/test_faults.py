"""Faults during training: stop signals save and resume exactly; non-finite losses skip their step."""
from __future__ import annotations

import copy
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from detr_ssl.__main__ import main
from detr_ssl.engine import train as train_module
from detr_ssl.engine.faults import BadSteps, TooManyBadSteps, stop_on_signals
from detr_ssl.engine.train import train_one_epoch
from detr_ssl.models.matcher import HungarianMatcher
from test_engine import LOGGER, MeanCriterion, PerImageDetector, RecordingTensorBoard, batches, make_batch, train_args

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--data_path", str(REPO_ROOT / "data" / "sample"), "--device", "cpu", "--num_workers", "0",
        "--backbone", "resnet18", "--backbone_weights", "none", "--backbone_norm", "batch", "--hidden_dim", "64",
        "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "128", "--num_queries", "10",
        "--min_size", "128", "--max_size", "192", "--batch_size", "1", "--no-tensorboard"]
# Three batches an epoch and no evaluation before the last epoch: a run of a few seconds.
SHORT = [*TINY, "--deterministic", "--limit_train_batches", "3", "--limit_val_batches", "1", "--eval_every", "10"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key, value in state_a.items():
            assert torch.equal(value, state_b[key]), key


# ---------------------------------------------------------------------------------------------
# stop signals


def test_stop_signals_are_noted_once_and_the_handlers_come_back(caplog):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        with stop_on_signals(LOGGER) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # e.g. during the checkpoint write: ignored
            assert stop.signum == signal.SIGTERM and stop.agreed("cpu") == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert "SIGTERM received: finishing the current optimizer step" in caplog.text
    assert "SIGINT received: already stopping" in caplog.text


def signal_after_steps(monkeypatch, steps: int, signum: int = signal.SIGTERM) -> None:
    """Deliver ``signum`` to this process during optimizer step number ``steps`` of the run."""
    optimizer_step, count = train_module._optimizer_step, itertools.count(1)

    def step_then_signal(*args, **kwargs):
        optimizer_step(*args, **kwargs)
        if next(count) == steps:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(train_module, "_optimizer_step", step_then_signal)


@pytest.mark.parametrize("accum_steps, stop_after_steps, batches_done", [("1", 2, 2), ("2", 1, 2)])
def test_run_stopped_by_sigterm_resumes_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch, accum_steps,
                                                                         stop_after_steps, batches_done):
    flags = [*SHORT, "--epochs", "2", "--keep_last", "0", "--accum_steps", accum_steps]
    main([*flags, "--output_dir", str(tmp_path / "straight")])
    handlers = signal.getsignal(signal.SIGTERM)

    with monkeypatch.context() as patch:
        signal_after_steps(patch, stop_after_steps)
        main([*flags, "--output_dir", str(tmp_path / "stopped")])  # returns: SIGTERM is a clean stop
    assert signal.getsignal(signal.SIGTERM) == handlers
    stopped = load(tmp_path / "stopped" / "checkpoint.pth")
    assert stopped["epoch"] == -1  # no epoch completed yet
    assert stopped["interrupted_at"] == {"epoch": 0, "batches": batches_done, "reason": "SIGTERM"}

    main([*flags, "--output_dir", str(tmp_path / "stopped"), "--resume", str(tmp_path / "stopped" / "checkpoint.pth")])
    resumed, straight = load(tmp_path / "stopped" / "checkpoint.pth"), load(tmp_path / "straight" / "checkpoint.pth")
    assert resumed["epoch"] == straight["epoch"] == 1 and "interrupted_at" not in resumed
    assert_same_training_state(straight, resumed)


def wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text()):
        assert process.poll() is None, f"the run ended early: {process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no '{text}' in {path} after {timeout} s"
        time.sleep(0.1)


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_to_a_cli_run_saves_a_checkpoint_that_resumes(tmp_path, signum, exit_code):
    flags = [*TINY, "--eval_every", "100", "--limit_val_batches", "1"]
    command = [sys.executable, "-m", "detr_ssl", *flags, "--epochs", "50", "--output_dir", str(tmp_path)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(tmp_path / "log.txt", "epoch 1 train:", process)  # a few optimizer steps done
        process.send_signal(signum)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == exit_code, output[-3000:]
    checkpoint = load(tmp_path / "checkpoint.pth")
    stopped_in = checkpoint["interrupted_at"]["epoch"]
    assert checkpoint["interrupted_at"]["reason"] == signal.Signals(signum).name
    assert checkpoint["epoch"] == stopped_in - 1 >= 1
    log = (tmp_path / "log.txt").read_text()
    assert f"{signal.Signals(signum).name} received: finishing the current optimizer step" in log
    assert f"continue with --resume {tmp_path / 'checkpoint.pth'}" in log
    assert not list(tmp_path.glob(".checkpoint.pth.*"))  # no temporary file left behind

    main([*flags, "--epochs", str(stopped_in + 1), "--output_dir", str(tmp_path),
          "--resume", str(tmp_path / "checkpoint.pth")])
    resumed = load(tmp_path / "checkpoint.pth")
    assert resumed["epoch"] == stopped_in and "interrupted_at" not in resumed
    assert f"epoch {stopped_in} stopped after {checkpoint['interrupted_at']['batches']} batches" in (
        tmp_path / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------
# non-finite losses


class NonFiniteAt(nn.Module):
    """``MeanCriterion`` whose losses are NaN on the chosen calls (0-based), gradients included."""

    def __init__(self, bad_calls: set[int]) -> None:
        super().__init__()
        self.criterion, self.bad_calls, self.calls = MeanCriterion(), bad_calls, itertools.count()
        self.weight_dict = self.criterion.weight_dict

    def forward(self, outputs, targets):
        losses = self.criterion(outputs, targets)
        if next(self.calls) in self.bad_calls:
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses


def train_with(criterion, loader, accum_steps=1, epoch=0, model=None, bad_steps=None, tb=None, **overrides):
    """Train a fresh ``PerImageDetector`` (or ``model``) with Adam: moments that a wrong step would change."""
    model = PerImageDetector() if model is None else model
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    args = train_args(accum_steps=accum_steps, clip_max_norm=0.3, **overrides)
    train_one_epoch(model, criterion, loader, optimizer, "cpu", epoch, args, tb or RecordingTensorBoard(), LOGGER,
                    bad_steps=bad_steps)
    return model, optimizer


def assert_same(a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]) -> None:
    assert_same_training_state({"model": a[0].state_dict(), "optimizer": a[1].state_dict()},
                               {"model": b[0].state_dict(), "optimizer": b[1].state_dict()})


@pytest.mark.parametrize("accum_steps, bad_batch, good_batches", [
    (1, 1, [0, 2, 3]),
    (2, 2, [0, 1]),  # a bad batch drops its whole accumulation window
    (2, 1, [2, 3]),  # also when the NaN gradients come before the window's last batch
])
def test_non_finite_loss_skips_its_step_and_training_goes_on(caplog, accum_steps, bad_batch, good_batches):
    data = batches(4)
    initial = PerImageDetector()
    tb = RecordingTensorBoard()
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        skipped = train_with(NonFiniteAt({bad_batch}), data, accum_steps, epoch=3, model=copy.deepcopy(initial),
                             tb=tb)
    reference = train_with(MeanCriterion(), [data[i] for i in good_batches], accum_steps, model=copy.deepcopy(initial))

    assert_same(skipped, reference)  # the bad step changed neither the parameters nor Adam's moments
    assert any(not torch.equal(a, b) for a, b in zip(skipped[0].parameters(), initial.parameters()))
    ids = [10 * bad_batch, 10 * bad_batch + 1]
    assert f"non-finite loss nan at epoch 3, batch {bad_batch}" in caplog.text
    assert f"image ids of the batch: {ids}" in caplog.text
    bad_step = 3 * (4 // accum_steps) + bad_batch // accum_steps
    assert ("train", bad_step, {"bad_steps": 1}) in tb.calls


class PerImageDetectorWithBatchNorm(PerImageDetector):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3, dtype=torch.float64)

    def forward(self, samples):
        return super().forward(type(samples)(self.norm(samples.tensors), samples.mask))


def test_a_corrupt_image_leaves_no_trace_in_the_batch_norm_statistics():
    data = batches(2)
    poisoned = data[1][0].tensors.clone()
    poisoned[0, 0, 0, 0] = float("inf")
    data[1] = make_batch(poisoned, [7, 9])
    model = PerImageDetectorWithBatchNorm()
    train_with(MeanCriterion(), data[:1], model=model)
    statistics = copy.deepcopy(model.norm.state_dict())

    train_with(MeanCriterion(), data[1:], model=model)
    for key, value in model.norm.state_dict().items():
        assert torch.equal(value, statistics[key]), key


def test_matching_survives_non_finite_outputs():
    outputs = {"pred_logits": torch.full((1, 3, 5), float("nan")), "pred_boxes": torch.full((1, 3, 4), float("inf"))}
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([1])}]
    (rows, cols), = HungarianMatcher(1.0, 5.0, 2.0)(outputs, targets)
    assert len(rows) == len(cols) == 1


def test_max_bad_steps_in_a_row_stop_training_with_the_last_good_model():
    initial = PerImageDetector()
    model = copy.deepcopy(initial)
    message = r"3 optimizer steps in a row had a non-finite loss \(--max_bad_steps 3\)"
    with pytest.raises(TooManyBadSteps, match=message) as stopped:
        train_with(NonFiniteAt({1, 2, 3}), batches(5), epoch=2, model=model, max_bad_steps=3)
    assert (stopped.value.epoch, stopped.value.batches) == (2, 4)
    reference = train_with(MeanCriterion(), batches(1), model=copy.deepcopy(initial))[0]
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_bad_steps_count_in_a_row_across_epochs_and_a_good_step_resets_them():
    counter = BadSteps(limit=3)
    train_with(NonFiniteAt({0, 1, 3, 4}), batches(5), bad_steps=counter)  # 2, a good step, 2
    assert (counter.in_a_row, counter.total) == (2, 4)
    with pytest.raises(TooManyBadSteps) as stopped:
        train_with(NonFiniteAt({0}), batches(2), epoch=1, bad_steps=counter)
    assert (stopped.value.epoch, stopped.value.batches) == (1, 1)


def test_cli_run_stopped_by_non_finite_losses_saves_the_last_good_state(tmp_path, monkeypatch):
    """From the third batch on every image is corrupt (inf): two bad steps end the run in epoch 1."""
    to_device, count = train_module.to_device, itertools.count(1)

    def corrupt_from_third_batch(samples, targets, device):
        samples, targets = to_device(samples, targets, device)
        if next(count) >= 3:
            samples.tensors[:, :, 0, 0] = float("inf")
        return samples, targets

    monkeypatch.setattr(train_module, "to_device", corrupt_from_third_batch)
    with pytest.raises(TooManyBadSteps, match="--max_bad_steps 2"):
        main([*SHORT, "--epochs", "3", "--max_bad_steps", "2", "--output_dir", str(tmp_path / "faulty")])
    monkeypatch.undo()
    main([*SHORT, "--epochs", "1", "--limit_train_batches", "2", "--output_dir", str(tmp_path / "good")])

    saved = load(tmp_path / "faulty" / "checkpoint.pth")
    assert saved["epoch"] == 0
    assert saved["interrupted_at"] == {"epoch": 1, "batches": 1, "reason": "non-finite losses"}
    assert_same_training_state(saved, load(tmp_path / "good" / "checkpoint.pth"))  # batch norm statistics too
    log = (tmp_path / "faulty" / "log.txt").read_text()
    assert "non-finite loss nan at epoch 0, batch 2" in log and "image ids of the batch: [" in log
    assert "2 optimizer steps in a row had a non-finite loss (--max_bad_steps 2)" in log
