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

from detr_ssl.methods import METHODS, method_of_state
from detr_ssl.utils.dist import all_gather_object, get_rank, get_world_size
from detr_ssl.utils.errors import MissingFileError, UserError

LATEST = "checkpoint.pth"
_EPOCH_FILE = re.compile(r"checkpoint(\d{4,})\.pth")


class UnsafeCheckpointError(UserError, RuntimeError):
    """The file needs code beyond tensors and plain values to load, and was refused."""


class CheckpointMismatchError(UserError, RuntimeError):
    """A strict load found keys or shapes that differ between checkpoint and model."""


class NotACheckpointError(UserError, ValueError):
    """The file is not a checkpoint (an image, a text file, a truncated file, another pickle)."""


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


# The first bytes of files that people pass by mistake, to say what the file is.
_MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
          b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image", b"%PDF": "a PDF document",
          b"\x1f\x8b": "a gzip archive", b"\x93NUMPY": "a NumPy array file"}
_EXPECTED = "expected a checkpoint written by torch.save, such as OUTPUT_DIR/checkpoint.pth or an official DETR .pth"


def _describe_file(path: Path) -> str:
    """What a file that did not load as a checkpoint looks like, from its first bytes."""
    head = path.read_bytes()[:64] if path.stat().st_size else b""
    if not head:
        return "an empty file"
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return what
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that torch cannot read (truncated or damaged while copying?)"
    if head.startswith(b"\x80"):
        return "a plain pickle, not written by torch.save (it was not unpickled: that would be unsafe)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file of an unknown format"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file (it starts with {first!r})"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint (file or http(s) URL) onto the CPU without executing any code in it.

    Raises ``UnsafeCheckpointError`` for a file that needs other Python objects than tensors,
    plain containers and ``argparse.Namespace`` (such a file is never unpickled further), and
    ``NotACheckpointError``, one line saying what the file is, for anything else that is not a
    checkpoint: an image, a text or YAML file, a truncated download, a pickle of other data.
    """
    location = str(path)
    is_url = location.startswith(("http://", "https://"))
    if not is_url and not Path(location).is_file():
        raise MissingFileError(f"checkpoint not found: {location}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            if is_url:
                checkpoint = torch.hub.load_state_dict_from_url(location, map_location="cpu", weights_only=True)
            else:
                checkpoint = torch.load(location, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not is_url and "Unsupported global" not in str(err):
            raise NotACheckpointError(f"{location} is not a checkpoint: it is {_describe_file(Path(location))}; "
                                      f"{_EXPECTED}") from err
        first_line = str(err).strip().splitlines()[-1]
        raise UnsafeCheckpointError(
            f"{location}: refused to load this checkpoint as unsafe; it was not executed. It needs "
            f"Python objects beyond tensors, plain values and argparse.Namespace ({first_line})."
        ) from err
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
        if is_url:
            raise
        raise NotACheckpointError(f"{location} is not a checkpoint: it is {_describe_file(Path(location))}; "
                                  f"{_EXPECTED}") from err
    if not isinstance(checkpoint, dict):
        raise NotACheckpointError(f"{location} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a "
                                  f"dict; {_EXPECTED}")
    return checkpoint


def model_state_of(checkpoint: dict[str, Any], location: str | os.PathLike) -> dict[str, Tensor]:
    """The model state dict of a checkpoint: its ``model`` entry, or the file itself when it is a
    bare state dict (torchvision / timm style). Anything else is refused by name."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        keys = ", ".join(map(str, list(checkpoint)[:8]))
        raise NotACheckpointError(f"{location} holds no model weights (its top-level keys: {keys}); expected a "
                                  "'model' entry of tensors, as OUTPUT_DIR/checkpoint.pth and official checkpoints have")
    return state


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


TRAINING_STATE = ("optimizer", "lr_scheduler", "epoch")


def resume_training(
    checkpoint: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    logger: logging.Logger,
    location: str | os.PathLike = "the checkpoint",
) -> int:
    """Continue the run of ``checkpoint`` exactly: the epoch to start at.

    Only a checkpoint of this very model continues: any missing, unexpected or mis-shaped key
    raises ``CheckpointMismatchError`` naming them, and a file without optimizer, schedule and
    epoch raises ``NotACheckpointError``. Starting from other weights is ``--finetune``.
    """
    lacking = [key for key in TRAINING_STATE if key not in checkpoint]
    if lacking:
        raise NotACheckpointError(f"--resume {location}: it holds no training state ({', '.join(lacking)} missing), "
                                  "so there is no run to continue; to train from its weights use --finetune "
                                  f"{location} (or --pretrain for a pre-training checkpoint)")
    try:
        load_model_state(model, model_state_of(checkpoint, location), logger, strict=True)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"--resume {location}: {err}. --resume continues the run that wrote it and "
                                      "needs its flags (e.g. --config OUTPUT_DIR/config.yaml); to start a new run "
                                      "from these weights use --finetune") from err
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    _restore_process_rng(checkpoint.get("rng_state"), logger)
    return checkpoint["epoch"] + 1


# Heads that only a pretext task or method reads: evaluating detection without them computes the same outputs.
PRETEXT_ONLY_PREFIXES = ("ssl_head.", *(prefix for method in METHODS.values() for prefix in method.module_prefixes))


def load_for_evaluation(model: nn.Module, checkpoint: dict[str, Any], location: str | os.PathLike,
                        logger: logging.Logger, hint: str = "") -> LoadReport:
    """Load the weights that an evaluation or a prediction measures: every tensor of the model
    must come from the checkpoint with its shape, or ``CheckpointMismatchError`` names what
    differs (followed by ``hint``). The checkpoint may hold more than the model only in
    pretext-task heads, which detection never reads."""
    state = model_state_of(checkpoint, location)
    own = _unwrap(model).state_dict()
    ignored = [k for k in state if k not in own and k.startswith(PRETEXT_ONLY_PREFIXES)]
    try:
        report = load_model_state(model, {k: v for k, v in state.items() if k not in ignored}, logger, strict=True)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{location}: {err}{hint}") from err
    if ignored:
        logger.info("pretext-task heads of the checkpoint not used to detect: %s", summarize_keys(ignored))
    return report


def summarize_keys(keys: list[str], depth: int = 2) -> str:
    """State-dict keys grouped by module (their first ``depth`` name parts, never the tensor's own
    name), for a readable log line: ``transformer.decoder.* (96 tensors), query_embed.weight``."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        groups.setdefault(".".join(parts[:min(depth, len(parts) - 1)]) or key, []).append(key)
    return ", ".join(f"{prefix}.* ({len(members)} tensors)" if len(members) > 1 else members[0]
                     for prefix, members in groups.items()) or "none"


def _log_transfer(flag: str, path: str | os.PathLike, loaded: list[str], skipped: list[str], new: list[str],
                  logger: logging.Logger) -> None:
    """The loaded / skipped / newly initialised keys of a weight transfer: grouped at info level,
    every key at debug level."""
    for what, keys in (("loaded", loaded), ("skipped (in the checkpoint, not loaded)", skipped),
                       ("newly initialised", new)):
        logger.info("%s %s: %s %d tensors: %s", flag, path, what, len(keys), summarize_keys(keys))
        logger.debug("%s %s: %s: %s", flag, path, what, ", ".join(keys) or "none")


def _transfer_weights(model: nn.Module, state: dict[str, Tensor], wanted: dict[str, Tensor], flag: str,
                      path: str | os.PathLike, logger: logging.Logger) -> LoadReport:
    """Load the tensors of ``wanted`` (part of ``state``) whose names and shapes fit the model;
    the rest of the model keeps its initialisation. The log lists loaded, skipped and new keys."""
    model = _unwrap(model)
    own = model.state_dict()
    fitting = {k: v for k, v in wanted.items() if k in own and v.shape == own[k].shape}
    if not fitting:
        raise CheckpointMismatchError(f"{flag} {path}: no tensor it hands on fits this model (same names and "
                                      "shapes); was it made with the same --model, --backbone and --hidden_dim?")
    model.load_state_dict(fitting, strict=False)
    _log_transfer(flag, path, list(fitting), [k for k in state if k not in fitting],
                  [k for k in own if k not in fitting], logger)
    return LoadReport(loaded=list(fitting), reinitialised=[k for k in wanted if k in own and k not in fitting],
                      missing=[k for k in own if k not in fitting], unexpected=[k for k in state if k not in own])


def load_finetune(model: nn.Module, path: str | os.PathLike, logger: logging.Logger) -> LoadReport:
    """Start a new run from another run's weights (``--finetune``): every tensor whose name and
    shape fit loads (a classifier for another class count does not); optimizer, schedule and
    epoch start afresh."""
    state = model_state_of(load_checkpoint(path), path)
    return _transfer_weights(model, state, state, "--finetune", path, logger)


PRETRAINED_PREFIXES = ("backbone.", "input_proj.", "transformer.encoder.", "transformer.level_embed")


def _pretrained_part(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a pre-training checkpoint that detection starts from.

    An encoder-task pre-training trained backbone, input projection and encoder only: its decoder
    and heads never learned. A whole-detector method's pre-training (recognised by its modules,
    e.g. UP-DETR's ``patch2query``) trained the decoder, queries and box head too: what the
    method hands on (everything but the classifier and its own heads) carries over.
    """
    method = method_of_state(state)
    if method is not None:
        return {k: v for k, v in method.pretrained_part(state).items() if not k.startswith(PRETEXT_ONLY_PREFIXES)}
    return {k: v for k, v in state.items() if k.startswith(PRETRAINED_PREFIXES)}


def load_pretrained_encoder(model: nn.Module, path: str | os.PathLike, logger: logging.Logger) -> LoadReport:
    """Start detection from a pre-training checkpoint (ours or an official UP-DETR one).

    What loads is what the pre-training trained (see ``_pretrained_part``); ``ssl_head.*``
    belongs to the pretext task and is skipped; shape mismatches stay initialised. The log lists
    the loaded, skipped and newly initialised keys.
    """
    state = model_state_of(load_checkpoint(path), path)
    return _transfer_weights(model, state, _pretrained_part(state), "--pretrain", path, logger)
