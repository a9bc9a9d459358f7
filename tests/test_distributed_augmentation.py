"""Every rank draws its own augmentation (2 gloo processes, workers on), and a resumed 2-process
run with augmentation equals an uninterrupted one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from detr_ssl.data.loader import augmentation_seed

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "data" / "sample"

# Each rank loads the first training batch of epoch 0 through build_loader/set_epoch, as the
# runner does, from a dataset whose every item is the same photo: identical batches on two ranks
# would mean one augmentation stream shared by both.
FIRST_BATCH_SCRIPT = '''
import sys
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from detr_ssl.config import parse_args
from detr_ssl.data import build_dataset, collate_fn
from detr_ssl.data.loader import build_loader, set_epoch

class SamePhoto(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset
    def __len__(self):
        return 8
    def __getitem__(self, index):
        return self.dataset[0]

dist.init_process_group("gloo")
rank = dist.get_rank()
args = parse_args(["--data_path", sys.argv[1], "--num_workers", "2", "--batch_size", "2", "--min_size", "256",
                   "--max_size", "320", "--backbone_weights", "none"])
loader = build_loader(SamePhoto(build_dataset("train", args)), args, train=True, collate_fn=collate_fn, rank=rank,
                      world_size=dist.get_world_size())
for epoch in (0, 1):
    set_epoch(loader, epoch, args.seed)
    samples, targets = next(iter(loader))
    torch.save({"images": samples.tensors, "boxes": [t["boxes"] for t in targets]}, f"{sys.argv[2]}/rank{rank}_epoch{epoch}.pt")
dist.destroy_process_group()
'''


def torchrun(args: list[str], port: int, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def first_batches(tmp_path: Path, port: int) -> dict[str, dict]:
    script = tmp_path / "first_batch.py"
    script.write_text(FIRST_BATCH_SCRIPT)
    out = tmp_path / f"batches{port}"
    out.mkdir()
    torchrun([str(script), str(SAMPLE), str(out)], port, REPO_ROOT)
    return {path.stem: torch.load(path, weights_only=True) for path in out.glob("*.pt")}


def same_batch(a: dict, b: dict) -> bool:
    return (a["images"].shape == b["images"].shape and torch.equal(a["images"], b["images"])
            and all(torch.equal(x, y) for x, y in zip(a["boxes"], b["boxes"])))


def test_each_rank_draws_its_own_augmentation_and_draws_it_again_on_a_rerun(tmp_path):
    batches = first_batches(tmp_path, 29541)
    assert sorted(batches) == ["rank0_epoch0", "rank0_epoch1", "rank1_epoch0", "rank1_epoch1"]
    for epoch in (0, 1):
        assert not same_batch(batches[f"rank0_epoch{epoch}"], batches[f"rank1_epoch{epoch}"])
    assert not same_batch(batches["rank0_epoch0"], batches["rank0_epoch1"])
    again = first_batches(tmp_path, 29542)
    assert all(same_batch(batches[name], again[name]) for name in batches)


def test_augmentation_seed_differs_by_rank_and_epoch_only():
    seeds = {augmentation_seed(42, epoch, rank) for epoch in range(3) for rank in range(8)}
    assert len(seeds) == 24 and augmentation_seed(42, 1, 3) == augmentation_seed(42, 1, 3)


def test_a_resumed_two_process_run_with_augmentation_equals_an_uninterrupted_one(tmp_path):
    flags = ["-m", "detr_ssl", "--data_path", str(SAMPLE), "--device", "cpu", "--num_workers", "2", "--backbone",
             "resnet18", "--backbone_weights", "none", "--backbone_norm", "batch", "--hidden_dim", "64", "--nheads",
             "4", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "128", "--num_queries", "10",
             "--min_size", "128", "--max_size", "192", "--batch_size", "1", "--augment", "--deterministic",
             "--limit_train_batches", "2", "--limit_val_batches", "1", "--eval_every", "10", "--keep_last", "0",
             "--no-tensorboard"]
    torchrun([*flags, "--epochs", "2", "--output_dir", str(tmp_path / "straight")], 29543, REPO_ROOT)
    torchrun([*flags, "--epochs", "1", "--output_dir", str(tmp_path / "halves")], 29544, REPO_ROOT)
    torchrun([*flags, "--epochs", "2", "--output_dir", str(tmp_path / "halves"), "--resume",
              str(tmp_path / "halves" / "checkpoint.pth")], 29545, REPO_ROOT)
    straight, resumed = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=True) for run in ("straight", "halves"))
    assert straight["epoch"] == resumed["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
