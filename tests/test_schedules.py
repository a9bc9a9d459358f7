"""SSL schedules through real runs: the criterion and the pretext task see each optimizer step's
scheduled lambda and ratio, a resumed run continues the same curve, and pre-training refuses a loss
schedule."""
from __future__ import annotations

import pytest

from detr_ssl.__main__ import main
from detr_ssl.config import parse_args
from detr_ssl.engine import train as train_module
from detr_ssl.ssl.mim import MIMContinuous
from test_faults import SHORT, signal_after_steps

# 2 epochs x 3 batches, one optimizer step per batch: 6 steps; lambda 1 -> 0, ratio 0.6 -> 0 (linear).
SCHEDULED = [*SHORT, "--epochs", "2", "--keep_last", "0", "--ssl_task", "mim_continuous", "--ssl_loss_coef", "1",
             "--ssl_ratio", "0.6", "--ssl_loss_schedule", "linear", "--ssl_ratio_schedule", "linear"]
LAMBDAS = [1 - step / 6 for step in range(6)]
RATIOS = [0.6 * (1 - step / 6) for step in range(6)]


def record_schedules(monkeypatch) -> dict[str, list[float]]:
    """Record the lambda the criterion's weights hold and the ratio the task masks with, per batch."""
    seen: dict[str, list[float]] = {"lambda": [], "ratio": []}
    logged_losses, corrupt = train_module.logged_losses, MIMContinuous.corrupt

    def recording_logged_losses(loss_dict, weight_dict):
        seen["lambda"].append(weight_dict["loss_ssl"])
        return logged_losses(loss_dict, weight_dict)

    def recording_corrupt(self, *args, **kwargs):
        seen["ratio"].append(self.ratio)
        return corrupt(self, *args, **kwargs)

    monkeypatch.setattr(train_module, "logged_losses", recording_logged_losses)
    monkeypatch.setattr(MIMContinuous, "corrupt", recording_corrupt)
    return seen


def test_criterion_and_task_see_the_scheduled_values_of_every_step_also_after_a_resume(tmp_path, monkeypatch):
    seen = record_schedules(monkeypatch)
    main([*SCHEDULED, "--output_dir", str(tmp_path / "straight")])
    assert seen["lambda"] == pytest.approx(LAMBDAS) and seen["ratio"] == pytest.approx(RATIOS)
    assert min(seen["lambda"]) > 0 and min(seen["ratio"]) > 0  # the last epoch still trains the task

    seen["lambda"].clear(), seen["ratio"].clear()
    with monkeypatch.context() as patch:
        signal_after_steps(patch, 4)  # stop inside the second epoch, after its first step
        main([*SCHEDULED, "--output_dir", str(tmp_path / "stopped")])
    main([*SCHEDULED, "--output_dir", str(tmp_path / "stopped"), "--resume",
          str(tmp_path / "stopped" / "checkpoint.pth")])
    assert seen["lambda"] == pytest.approx(LAMBDAS) and seen["ratio"] == pytest.approx(RATIOS)


def test_accumulated_steps_share_one_scheduled_value(tmp_path, monkeypatch):
    seen = record_schedules(monkeypatch)
    main([*SCHEDULED, "--limit_train_batches", "4", "--accum_steps", "2", "--output_dir", str(tmp_path)])
    # 2 epochs x 2 optimizer steps of 2 batches each: lambda 1, 0.75, 0.5, 0.25, each for both batches
    assert seen["lambda"] == pytest.approx([1, 1, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25])


def test_a_loss_schedule_in_pretraining_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--ssl_task", "mim_continuous", "--ssl_mode", "pretrain", "--ssl_loss_schedule", "cosine"])
    assert "--ssl_loss_schedule cosine weighs the SSL loss against detection" in capsys.readouterr().err
    assert parse_args(["--ssl_task", "mim_continuous", "--ssl_mode", "pretrain", "--ssl_ratio_schedule", "cosine"])
