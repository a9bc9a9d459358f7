"""End-to-end runs through the command line: outputs, exact resume, 2-process gloo, config errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from detr_ssl.__main__ import main
from conftest import cli_error
from detr_ssl.config import parse_args
from detr_ssl.engine.runner import run
from detr_ssl.engine.checkpoint import CheckpointMismatchError, NotACheckpointError

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "data" / "sample"

# A tiny DETR that runs a step in well under a second on a CPU.
SMALL = ["--data_path", str(SAMPLE), "--device", "cpu", "--num_workers", "0", "--backbone", "resnet18",
         "--backbone_weights", "none", "--backbone_norm", "batch", "--hidden_dim", "64", "--nheads", "4",
         "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "128", "--num_queries", "10",
         "--min_size", "128", "--max_size", "192", "--batch_size", "2"]


def run_cli(output_dir: Path, *flags: str) -> None:
    main([*SMALL, "--output_dir", str(output_dir), *flags])


DEFORMABLE = ["--model", "deformable_detr", "--num_feature_levels", "3", "--msda_backend", "pytorch"]


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE, DEFORMABLE + ["--with_box_refine", "--two_stage", "--amp"]],
                         ids=["detr", "deformable_detr", "deformable_detr_two_stage_amp"])
def test_two_iteration_run_writes_checkpoint_config_tensorboard_and_results(tmp_path, model_flags):
    run_cli(tmp_path, "--epochs", "1", "--limit_train_batches", "2", "--limit_val_batches", "1", *model_flags)

    checkpoint = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args"} <= set(checkpoint)
    assert checkpoint["epoch"] == 0
    assert list(tmp_path.glob("tensorboard/events.out.tfevents.*"))
    results = json.loads((tmp_path / "results_0000.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["epoch"] == 0 and "val_AP" in log[0] and "train_loss" in log[0]
    # The saved config reproduces the run's configuration.
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["hidden_dim"] == 64 and saved["num_classes"] == 91
    reparsed = parse_args(["--config", str(tmp_path / "config.yaml")])
    assert reparsed.hidden_dim == 64 and reparsed.num_queries == 10 and reparsed.data_path == str(SAMPLE)
    assert reparsed.model == (model_flags[1] if model_flags else "detr")


def test_eval_of_a_checkpoint_repeats_the_runs_last_evaluation_under_its_epoch(tmp_path):
    flags = ["--limit_val_batches", "2", "--no-tensorboard"]
    run_cli(tmp_path / "train", "--epochs", "2", "--limit_train_batches", "1", *flags)
    run_cli(tmp_path / "eval", "--eval", "--resume", str(tmp_path / "train" / "checkpoint.pth"), *flags)

    assert [p.name for p in (tmp_path / "eval").glob("results_*.json")] == ["results_0001.json"]
    evaluated = json.loads((tmp_path / "eval" / "results_0001.json").read_text())
    assert evaluated and evaluated == json.loads((tmp_path / "train" / "results_0001.json").read_text())
    assert "epoch 1 val" in (tmp_path / "eval" / "log.txt").read_text()


def test_eval_builds_the_checkpoints_model_from_its_saved_configuration(tmp_path):
    """The README's eval line with no architecture flags: a ResNet-18 checkpoint is evaluated as
    one (not as the default ResNet-50, and with nothing downloaded)."""
    flags = ["--limit_val_batches", "2", "--no-tensorboard"]
    run_cli(tmp_path / "train", "--epochs", "1", "--limit_train_batches", "1", *flags)
    main(["--data_path", str(SAMPLE), "--device", "cpu", "--num_workers", "0", "--eval", "--resume",
          str(tmp_path / "train" / "checkpoint.pth"), "--output_dir", str(tmp_path / "eval"), *flags])
    log = (tmp_path / "eval" / "log.txt").read_text()
    assert "--eval: from the checkpoint's configuration: " in log
    adopted = log.split("--eval: from the checkpoint's configuration: ")[1].split("\n")[0]
    assert all(flag in adopted for flag in ("--backbone resnet18", "--hidden_dim 64", "--num_queries 10",
                                            "--min_size 128", "--backbone_weights none"))
    evaluated = json.loads((tmp_path / "eval" / "results_0000.json").read_text())
    assert evaluated == json.loads((tmp_path / "train" / "results_0000.json").read_text())


def test_checkpoints_that_do_not_fit_stop_eval_and_resume_and_finetune_starts_a_new_run(tmp_path, capsys):
    """--eval and --resume never run a partly random model; --finetune is the way to other flags."""
    flags = ["--limit_train_batches", "1", "--limit_val_batches", "1", "--no-tensorboard"]
    run_cli(tmp_path / "train", "--epochs", "1", *flags)
    checkpoint = str(tmp_path / "train" / "checkpoint.pth")
    other_model = ["--num_queries", "12", "--dec_layers", "3"]

    error = cli_error(capsys, [*SMALL, "--output_dir", str(tmp_path / "eval"), "--eval", "--resume", checkpoint,
                               *other_model, *flags])
    assert re.search(r"query_embed\.weight \(checkpoint 10x64, model 12x64\).*missing in the checkpoint: "
                     r"transformer\.decoder\.layers\.2", error), error
    assert not list((tmp_path / "eval").glob("results_*.json"))
    with pytest.raises(CheckpointMismatchError, match=r"--resume .*query_embed\.weight.*--finetune"):
        run(parse_args([*SMALL, "--output_dir", str(tmp_path / "resumed"), "--epochs", "2", "--resume", checkpoint,
                        *other_model, *flags]))
    assert not (tmp_path / "resumed" / "checkpoint.pth").exists()

    run_cli(tmp_path / "fine", "--epochs", "1", "--finetune", checkpoint, *other_model, *flags)
    log = (tmp_path / "fine" / "log.txt").read_text()
    assert "--finetune" in log and "newly initialised" in log and "query_embed.weight" in log.split("newly")[1]
    assert "training from epoch 0" in log
    loaded = log.split(": loaded ")[1].split("\n")[0]
    assert "backbone.0.* (" in loaded and "transformer.encoder.* (" in loaded and "query_embed" not in loaded
    fine = torch.load(tmp_path / "fine" / "checkpoint.pth", weights_only=True)
    assert fine["epoch"] == 0 and fine["model"]["query_embed.weight"].shape == (12, 64)


def test_a_weights_only_checkpoint_is_refused_by_resume_and_loads_with_finetune(tmp_path, capsys):
    flags = ["--epochs", "1", "--limit_train_batches", "1", "--limit_val_batches", "1", "--no-tensorboard"]
    run_cli(tmp_path / "train", *flags)
    weights = tmp_path / "weights.pth"
    torch.save({"model": torch.load(tmp_path / "train" / "checkpoint.pth", weights_only=True)["model"]}, weights)
    error = cli_error(capsys, [*SMALL, "--output_dir", str(tmp_path / "resumed"), "--resume", str(weights), *flags])
    assert "no training state" in error and "--finetune" in error
    run_cli(tmp_path / "fine", "--finetune", str(weights), *flags)
    assert "--finetune" in (tmp_path / "fine" / "log.txt").read_text()


def test_eval_of_a_text_file_says_in_one_line_that_it_is_not_a_checkpoint(tmp_path, capsys):
    notes = tmp_path / "notes.yaml"
    notes.write_text("epochs: 3\n")
    error = cli_error(capsys, [*SMALL, "--output_dir", str(tmp_path / "eval"), "--eval", "--resume", str(notes)])
    assert error.startswith(f"error: {notes} is not a checkpoint: it is a text file"), error
    with pytest.raises(NotACheckpointError):  # --debug: the exception itself, with its traceback
        main([*SMALL, "--output_dir", str(tmp_path / "eval"), "--eval", "--resume", str(notes), "--debug"])


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE, ["--ssl_task", "mim_continuous"]],
                         ids=["detr", "deformable_detr", "detr_mim"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, model_flags):
    flags = ["--deterministic", "--limit_train_batches", "2", "--limit_val_batches", "1", "--keep_last", "0",
             "--no-tensorboard", "--augment", "--eval_every", "10", *model_flags]
    run_cli(tmp_path / "straight", "--epochs", "2", *flags)
    run_cli(tmp_path / "halves", "--epochs", "1", *flags)
    run_cli(tmp_path / "halves", "--epochs", "2", "--resume", str(tmp_path / "halves" / "checkpoint.pth"), *flags)

    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    resumed = torch.load(tmp_path / "halves" / "checkpoint.pth", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("straight", "halves")]
    assert losses[0] == losses[1]


def test_two_process_gloo_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29533"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "detr_ssl", *SMALL, "--output_dir", str(tmp_path), "--epochs", "1", "--batch_size", "1",
               "--accum_steps", "2", "--limit_train_batches", "2", "--limit_val_batches", "1"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "effective batch: 2 processes x 1 images x 2 accumulation steps = 4 images" in log
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and (tmp_path / "results_0000.json").is_file()


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("hiden_dim: 64\n", "unknown key 'hiden_dim'"),
        ("hidden_dim: wide\n", "key 'hidden_dim': expected int"),
        ("backbone: vgg16\n", "'vgg16' is not one of"),
        ("augment: 1\n", "key 'augment': expected true or false"),
    ],
)
def test_bad_yaml_is_an_error_naming_file_and_key(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])
    err = capsys.readouterr().err
    assert message in err and str(config) in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hidden_dim", "100", "--nheads", "8"], "--hidden_dim (100) must be divisible by --nheads (8)"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--min_size", "900", "--max_size", "800"], "--max_size (800) must be >= --min_size (900)"),
        (["--resume", "/nonexistent/checkpoint.pth"], "--resume: checkpoint not found"),
        (["--finetune", "/nonexistent/checkpoint.pth"], "--finetune: checkpoint not found"),
        (["--resume", __file__, "--finetune", __file__], "--resume and --finetune: give one"),
        (["--resume", __file__, "--pretrain", __file__], "--resume and --pretrain: give one"),
    ],
)
def test_impossible_values_fail_before_any_work(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


def test_cli_flags_override_yaml_which_overrides_defaults(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("hidden_dim: 64\nnheads: 4\nlr: 3.0e-4\n")
    args = parse_args(["--config", str(config), "--lr", "5e-5"])
    assert (args.hidden_dim, args.nheads, args.lr) == (64, 4, 5e-5)
    assert args.num_queries == 100 and args.lr_backbone == 1e-5  # official DETR defaults


def test_too_small_num_classes_is_refused(tmp_path, capsys):
    error = cli_error(capsys, [*SMALL, "--output_dir", str(tmp_path), "--num_classes", "10", "--epochs", "1"])
    assert "--num_classes 10 is too small" in error


def test_flags_without_a_dataset_say_how_to_run_the_demo_with_them(capsys, tmp_path):
    error = cli_error(capsys, ["--output_dir", str(tmp_path), "--device", "cpu"])
    assert "--data_path ROOT" in error and "--config configs/demo.yaml" in error


def test_checkpoint_every_saves_every_n_epochs_and_after_the_last(tmp_path):
    run_cli(tmp_path, "--epochs", "5", "--checkpoint_every", "2", "--keep_last", "5", "--eval_every", "5",
            "--limit_train_batches", "1")
    assert sorted(p.name for p in tmp_path.glob("checkpoint0*.pth")) == ["checkpoint0001.pth", "checkpoint0003.pth",
                                                                       "checkpoint0004.pth"]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 4


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 0), (3, 2), (16, 2)])
def test_data_workers_default_to_none_on_two_cores_and_to_the_official_two_beyond(monkeypatch, cores, workers):
    from detr_ssl import config

    monkeypatch.setattr(config, "available_cores", lambda: cores)
    assert config.parse_args(["--data_path", str(SAMPLE)]).num_workers == workers
    assert config.parse_args(["--data_path", str(SAMPLE), "--num_workers", "1"]).num_workers == 1
