"""Data loaders whose order depends only on (seed, epoch) and whose augmentation depends only on
(seed, epoch, rank), so resuming is exact and every process draws its own augmentation."""
from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler


def _init_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in each worker from the worker's torch seed, and leave stop
    signals to the main process: a worker killed by Ctrl-C or SIGTERM sent to the process group
    would break the batch the main process is still finishing before it saves."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class ResumableBatchSampler(BatchSampler):
    """A ``BatchSampler`` that can start the epoch at batch ``start``: the batches before it are
    skipped without being loaded, since loading would draw their random augmentation."""

    start = 0

    def __iter__(self) -> Iterator[list[int]]:
        return islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(super().__len__() - self.start, 0)


def build_loader(dataset: Dataset, args, train: bool, collate_fn, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader over this process's shard; call :func:`set_epoch` before each training epoch.

    ``DistributedSampler`` is used in single-process runs too: its shuffle is seeded by
    ``seed + epoch``, which is what makes an interrupted run resume with the same order.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=args.seed,
                                 drop_last=False)
    generator = torch.Generator()
    generator.manual_seed(args.seed)
    drop_last = train and len(dataset) >= args.batch_size * world_size
    batch_sampler = ResumableBatchSampler(sampler, args.batch_size, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available() and str(args.device).startswith("cuda"),
        worker_init_fn=_init_worker,
        generator=generator,
    )


def augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one process's augmentation in one epoch: a hash of all three, so that every
    rank (and, from it, every worker: torch adds the worker id) draws its own flips, scales and
    crops, and the same run on resume draws the same ones again."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0])


def set_epoch(loader: DataLoader, epoch: int, seed: int, start_batch: int = 0) -> None:
    """Reshuffle for ``epoch``, reseed the augmentation of this process's workers from (seed,
    epoch, rank) and start at ``start_batch`` (a resumed epoch); ``len(loader)`` counts the
    batches left. The rank is the loader's own (``build_loader``'s ``rank``)."""
    sampler = loader.batch_sampler.sampler
    sampler.set_epoch(epoch)
    loader.batch_sampler.start = start_batch
    loader.generator.manual_seed(augmentation_seed(seed, epoch, sampler.rank))
