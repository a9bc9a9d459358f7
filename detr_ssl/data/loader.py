"""Data loaders whose order and augmentation depend only on (seed, epoch), so resuming is exact."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler


def _seed_worker(worker_id: int) -> None:
    """Give numpy and ``random`` in each worker a seed derived from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset: Dataset, args, train: bool, collate_fn, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader over this process's shard; call :func:`set_epoch` before each training epoch.

    ``DistributedSampler`` is used in single-process runs too: its shuffle is seeded by
    ``seed + epoch``, which is what makes an interrupted run resume with the same order.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=args.seed,
                                 drop_last=False)
    generator = torch.Generator()
    generator.manual_seed(args.seed)
    batch_sampler = BatchSampler(sampler, args.batch_size, drop_last=train and len(dataset) >= args.batch_size * world_size)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available() and str(args.device).startswith("cuda"),
        worker_init_fn=_seed_worker,
        generator=generator,
    )


def set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Reshuffle for ``epoch`` and reseed the augmentation of the workers from (seed, epoch)."""
    loader.batch_sampler.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100_003 + epoch)
