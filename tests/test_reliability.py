"""Runs that survive faults: killed writes, hostile files, bad data in workers, distributed failures."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from detr_ssl.config import parse_args
from detr_ssl.data import build_dataset, collate_fn
from detr_ssl.engine.checkpoint import save_checkpoint
from detr_ssl.models import build_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "data" / "sample"
TINY = ["--device", "cpu", "--num_workers", "0", "--backbone", "resnet18", "--backbone_weights", "none",
        "--hidden_dim", "64", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "128",
        "--num_queries", "10", "--min_size", "128", "--max_size", "192", "--dropout", "0"]

WRITER = """
import sys, torch
from detr_ssl.engine.checkpoint import save_checkpoint
state = {"model": {"w": torch.full((4_000_000,), 2.0)}, "epoch": 2}
print("writing", flush=True)
while True:
    save_checkpoint(sys.argv[1], state)
"""


class CreatesFile:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def write_hostile(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"model": CreatesFile(marker)}, f)


def test_sigkill_while_writing_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT)
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(1.0)  # several writes of a 16 MB tensor are under way
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    state = torch.load(path, weights_only=True)  # the old file or a complete new one, never a torn one
    assert state["epoch"] in (1, 2)
    expected = torch.ones(3) if state["epoch"] == 1 else torch.full((4_000_000,), 2.0)
    assert torch.equal(state["model"]["w"], expected)


@pytest.mark.parametrize("flag", ["--backbone_weights", "--pretrain", "--resume"])
def test_code_executing_weight_files_are_refused_and_never_run(tmp_path, flag):
    hostile, marker = tmp_path / "weights.pth", tmp_path / "pwned"
    write_hostile(hostile, marker)
    args = parse_args([*TINY, "--data_path", str(SAMPLE), "--output_dir", str(tmp_path / "run"), "--epochs", "1",
                       flag, str(hostile)])
    from detr_ssl.engine.runner import run

    with pytest.raises(Exception, match="weights_only|safely|unsafe|Unsafe"):
        run(args)
    assert not marker.exists()


def test_broken_annotation_json_is_named(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root)
    ann = root / "annotations" / "instances_train.json"
    ann.write_text(ann.read_text()[:200])
    with pytest.raises(ValueError, match=r"instances_train\.json: not valid JSON"):
        build_dataset("train", parse_args([*TINY, "--data_path", str(root)]))


@pytest.mark.parametrize("dataset_flags", [[], ["--dataset_file", "folder", "--ssl_task", "mim_continuous",
                                                "--ssl_mode", "pretrain"]], ids=["coco", "folder"])
def test_a_corrupt_image_in_a_worker_process_names_its_file(tmp_path, dataset_flags):
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root)
    victim = root / "train" / "000000000025.jpg"
    victim.write_bytes(victim.read_bytes()[:2000])  # truncated JPEG
    data_path = root / "train" if dataset_flags else root
    dataset = build_dataset("train", parse_args([*TINY, "--data_path", str(data_path), *dataset_flags]))
    loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=collate_fn)
    with pytest.raises(Exception, match="000000000025.jpg"):
        for _ in loader:
            pass


def run_torchrun(tmp_path: Path, port: int, nproc: int, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), "-m", "detr_ssl", *TINY, *flags]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    """1 process x 2 images == 2 processes x 1 image: same global batches, averaged gradients.

    Frozen BatchNorm (per-process statistics would differ) and no augmentation; the padding of a
    2-image batch differs from two 1-image batches, so losses agree within a tolerance, not bitwise.
    """
    flags = ["--data_path", str(SAMPLE), "--epochs", "2", "--no-augment", "--deterministic", "--no-tensorboard",
             "--eval_every", "10", "--limit_val_batches", "1"]
    single = run_torchrun(tmp_path, 29541, 1, *flags, "--batch_size", "2", "--output_dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_torchrun(tmp_path, 29542, 2, *flags, "--batch_size", "1", "--output_dir", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-3000:]
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=0.015)  # measured: 0.7 % and 0.4 % apart


def test_a_failing_process_stops_the_others_instead_of_hanging(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root)
    victim = root / "train" / "000000000030.jpg"
    victim.write_bytes(victim.read_bytes()[:2000])
    started = time.time()
    result = run_torchrun(tmp_path, 29543, 2, "--data_path", str(root), "--batch_size", "1", "--epochs", "1",
                          "--output_dir", str(tmp_path / "run"), timeout=240)
    assert result.returncode != 0
    assert "000000000030.jpg" in result.stderr
    assert time.time() - started < 240


def test_mismatched_checkpoint_keys_are_reported_by_name(tmp_path, caplog):
    from detr_ssl.engine.checkpoint import load_model_state

    model, _, _ = build_model(parse_args([*TINY, "--num_classes", "91"]))
    other, _, _ = build_model(parse_args([*TINY, "--num_classes", "16", "--num_queries", "7"]))
    import logging

    with caplog.at_level(logging.WARNING, logger="test"):
        report = load_model_state(model, other.state_dict(), logging.getLogger("test"))
    assert set(report.reinitialised) == {"class_embed.weight", "class_embed.bias", "query_embed.weight"}
    assert "class_embed.weight" in caplog.text and "query_embed.weight" in caplog.text
