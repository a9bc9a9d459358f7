"""Checkpoints in the official DETR format: saved atomically, loaded without running code.

A checkpoint is ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args', 'rng_state', ...}``;
ours also hold ``categories`` (the annotations' category names by id, empty for unlabelled data).
Everything in it is tensors and plain Python values, so ``torch.load(weights_only=True)``
reads it; official DETR checkpoints also hold an ``argparse.Namespace``, the one class we allow.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from detr_ssl.utils.dist import all_gather_object, get_rank, get_world_size

LATEST = "checkpoint.pth"
_EPOCH_FILE = re.compile(r"checkpoint(\d{4,})\.pth")


class UnsafeCheckpointError(RuntimeError):
    """The file needs code beyond tensors and plain values to load, and was refused."""


class CheckpointMismatchError(RuntimeError):
    """A strict load found keys or shapes that differ between checkpoint and model."""


# ---------------------------------------------------------------------------------------------
# random number generators


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's and torch's global generators as tensors and ints."""
    version, mt_words, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(mt_words, dtype=torch.int64), gauss_next],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo ``capture_rng_state``: the generators continue exactly where they were."""
    version, mt_words, gauss_next = state["python"]
    random.setstate((version, tuple(mt_words.tolist()), gauss_next))
    keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in zip(range(torch.cuda.device_count()), state["cuda"]):
            torch.cuda.set_rng_state(cuda_state, device)


# ---------------------------------------------------------------------------------------------
# saving


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def build_checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    args: argparse.Namespace | dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Everything needed to resume after ``epoch``, in the official layout.

    ``rng_state`` holds one entry per process (index = rank), so that a resumed multi-process
    run continues every process's random stream. That makes this a collective call: run it on
    every process, then save on the main one.
    """
    return {
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "args": vars(args) if isinstance(args, argparse.Namespace) else dict(args),
        "rng_state": all_gather_object(capture_rng_state()),
        **extra,
    }


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` so that ``path`` is always either the old file or the complete new one.

    The data goes to a temporary file in the same directory, reaches the disk (fsync) and then
    replaces ``path`` in one rename; a crash or full disk mid-way leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def rotate_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` ``checkpointNNNN.pth``; ``checkpoint.pth`` stays."""
    numbered = []
    for file in Path(output_dir).iterdir():
        match = _EPOCH_FILE.fullmatch(file.name)
        if match:
            numbered.append((int(match.group(1)), file))
    numbered.sort()
    for _, file in numbered[: max(len(numbered) - keep_last, 0)]:
        file.unlink()


def save_epoch_checkpoint(output_dir: str | os.PathLike, state: dict[str, Any], keep_last: int) -> None:
    """Save ``checkpoint.pth`` and, with ``keep_last`` > 0, ``checkpoint{epoch:04d}.pth``.

    The numbered copy is a hard link to the same bytes (written once; a later ``os.replace`` of
    ``checkpoint.pth`` leaves it intact), or a second write where links are not supported.
    Older numbered files are deleted only once the new ones are on disk.
    """
    output_dir = Path(output_dir)
    latest = output_dir / LATEST
    save_checkpoint(latest, state)
    if keep_last > 0:
        numbered = output_dir / f"checkpoint{state['epoch']:04d}.pth"
        link = numbered.with_name(f".{numbered.name}.link")
        try:
            link.unlink(missing_ok=True)
            os.link(latest, link)
            os.replace(link, numbered)
        except OSError:
            link.unlink(missing_ok=True)
            save_checkpoint(numbered, state)
    rotate_checkpoints(output_dir, keep_last)


# ---------------------------------------------------------------------------------------------
# loading


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint (file or http(s) URL) onto the CPU without executing any code in it.

    Raises ``UnsafeCheckpointError`` for a file that needs other Python objects than tensors,
    plain containers and ``argparse.Namespace``; such a file is never unpickled further.
    """
    location = str(path)
    is_url = location.startswith(("http://", "https://"))
    if not is_url and not Path(location).is_file():
        raise FileNotFoundError(f"checkpoint not found: {location}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            if is_url:
                return torch.hub.load_state_dict_from_url(location, map_location="cpu", weights_only=True)
            return torch.load(location, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[-1]
        raise UnsafeCheckpointError(
            f"{location}: refused to load this checkpoint as unsafe; it was not executed. It needs "
            f"Python objects beyond tensors, plain values and argparse.Namespace ({first_line})."
        ) from err


@dataclass
class LoadReport:
    """Which state-dict keys ``load_model_state`` loaded, re-initialised, missed or ignored."""

    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when the checkpoint matched the model key for key and shape for shape."""
        return not (self.reinitialised or self.missing or self.unexpected)


def _shape(tensor: Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def load_model_state(
    model: nn.Module, state_dict: dict[str, Tensor], logger: logging.Logger, strict: bool = False
) -> LoadReport:
    """Load ``state_dict`` into ``model``, tolerating what fine-tuning changes.

    Tensors whose shape differs (a classifier for another class count) keep the model's fresh
    initialisation instead of failing as ``load_state_dict`` does; missing and unexpected keys
    are reported. With ``strict=True`` any difference raises ``CheckpointMismatchError``.
    """
    model = _unwrap(model)
    own = model.state_dict()
    mismatched = {k: v for k, v in state_dict.items() if k in own and v.shape != own[k].shape}
    report = LoadReport(
        loaded=[k for k in state_dict if k in own and k not in mismatched],
        reinitialised=list(mismatched),
        missing=[k for k in own if k not in state_dict],
        unexpected=[k for k in state_dict if k not in own],
    )
    shapes = {k: f"checkpoint {_shape(v)}, model {_shape(own[k])}" for k, v in mismatched.items()}
    if strict and not report.exact:
        problems = [
            ("shape mismatches", [f"{k} ({note})" for k, note in shapes.items()]),
            ("missing in the checkpoint", report.missing),
            ("not in the model", report.unexpected),
        ]
        details = "; ".join(f"{what}: {', '.join(keys)}" for what, keys in problems if keys)
        raise CheckpointMismatchError(f"checkpoint does not match the model: {details}")
    model.load_state_dict({k: state_dict[k] for k in report.loaded}, strict=False)
    logger.info("loaded %d of %d model tensors from the checkpoint", len(report.loaded), len(own))
    for key, note in shapes.items():
        logger.warning("%s re-initialised (%s)", key, note)
    if report.missing:
        logger.warning("missing in the checkpoint, left as initialised: %s", ", ".join(report.missing))
    if report.unexpected:
        logger.warning("in the checkpoint but not in the model, ignored: %s", ", ".join(report.unexpected))
    return report


def _restore_process_rng(rng_states: list[dict[str, Any]] | None, logger: logging.Logger) -> None:
    """Restore this process's generators when the checkpoint has one state per current process."""
    if rng_states is not None and len(rng_states) == get_world_size():
        restore_rng_state(rng_states[get_rank()])
        return
    saved = "no random state" if rng_states is None else f"random states of {len(rng_states)} processes"
    logger.warning("checkpoint holds %s for %d processes: random streams start from the seed", saved, get_world_size())


def resume_training(
    checkpoint: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    logger: logging.Logger,
) -> int | None:
    """Continue from ``checkpoint``: the epoch to start at, or None if only weights were loaded.

    Optimizer, scheduler, random state and epoch are taken only when the model matched exactly
    (e.g. not after re-initialising a head), since stale optimizer moments would not fit.
    """
    report = load_model_state(model, checkpoint["model"], logger)
    complete = all(key in checkpoint for key in ("optimizer", "lr_scheduler", "epoch"))
    if not (report.exact and complete):
        logger.warning("checkpoint used for its weights only: optimizer, schedule and epoch start afresh")
        return None
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    _restore_process_rng(checkpoint.get("rng_state"), logger)
    return checkpoint["epoch"] + 1


PRETRAINED_PREFIXES = ("backbone.", "input_proj.", "transformer.encoder.", "transformer.level_embed")
# What a query-patch (UP-DETR) pre-training does not hand on: the object/no-object classifier and
# the patch-only heads, as the official fine-tuning, which drops class_embed and ignores the rest.
NOT_FROM_QUERY_PATCHES = ("class_embed.", "patch_class_embed.", "patch2query.", "feature_align.", "ssl_head.")


def _pretrained_part(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a pre-training checkpoint that detection starts from.

    An encoder-task pre-training trained backbone, input projection and encoder only: its decoder
    and heads never learned. A query-patch pre-training (recognised by ``patch2query``) trained
    the decoder, queries and box head too, so everything but the classifiers carries over.
    """
    if "patch2query.weight" in state:
        return {k: v for k, v in state.items() if not k.startswith(NOT_FROM_QUERY_PATCHES)}
    return {k: v for k, v in state.items() if k.startswith(PRETRAINED_PREFIXES)}


def load_pretrained_encoder(model: nn.Module, path: str | os.PathLike, logger: logging.Logger) -> LoadReport:
    """Start detection from a pre-training checkpoint (ours or an official UP-DETR one).

    What loads is what the pre-training trained (see ``_pretrained_part``); ``ssl_head.*``
    belongs to the pretext task and is skipped; shape mismatches stay initialised. The log lists
    the loaded, skipped and newly initialised keys.
    """
    state = load_checkpoint(path)
    state = state.get("model", state)
    model = _unwrap(model)
    own = model.state_dict()
    wanted = _pretrained_part(state)
    loaded = [k for k, v in wanted.items() if k in own and v.shape == own[k].shape]
    if not loaded:
        raise CheckpointMismatchError(f"--pretrain {path}: no backbone or encoder tensor fits this model; "
                                      "was it made with the same --model, --backbone and --hidden_dim?")
    model.load_state_dict({k: wanted[k] for k in loaded}, strict=False)
    skipped = [k for k in state if k not in loaded]
    new = [k for k in own if k not in loaded]
    logger.info("--pretrain %s: loaded %d tensors (%s)", path, len(loaded), ", ".join(loaded))
    logger.info("--pretrain: skipped %d tensors of the checkpoint (%s)", len(skipped), ", ".join(skipped) or "none")
    logger.info("--pretrain: newly initialised %d tensors (%s)", len(new), ", ".join(new) or "none")
    return LoadReport(loaded=loaded, reinitialised=[k for k in wanted if k in own and k not in loaded],
                      missing=new, unexpected=[k for k in state if k not in own])
