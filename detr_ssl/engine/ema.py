"""``--model_ema``: an exponential moving average of the detector's weights (as timm's ModelEmaV2).

The average is a copy of the bare detector (never the DistributedDataParallel wrapper, so it
needs no collective calls and every process keeps the same average), in eval mode and without
gradients. Every floating-point state tensor is averaged, buffers included (batch-norm
statistics, a method's momentum copy): the average is a whole detector that evaluates as it is;
integer buffers (batch counts) are copied.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from ..utils.errors import ConfigError


class ModelEma:
    """``ema <- decay * ema + (1 - decay) * model`` for every state tensor, after each optimizer
    step; ``module`` is the averaged detector, which evaluates like the model."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current state (the same architecture)."""
        for averaged, current in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if averaged.is_floating_point():
                averaged.mul_(self.decay).add_(current.detach(), alpha=1 - self.decay)
            else:
                averaged.copy_(current)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged detector's state dict: the model's keys, so it loads as a model."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state_dict)


def resume_ema(ema: ModelEma, checkpoint: dict, logger: logging.Logger) -> None:
    """Continue the average a ``--model_ema`` checkpoint holds; a checkpoint without one starts it
    from the resumed weights, and says so."""
    if "model_ema" in checkpoint:
        ema.load_state_dict(checkpoint["model_ema"])
    else:
        logger.warning("--model_ema: the checkpoint holds no EMA weights: the average starts from its model")


def ema_weights(checkpoint: dict, location: str) -> dict:
    """The checkpoint with its EMA weights as its model, for ``--eval_ema``."""
    if "model_ema" not in checkpoint:
        raise ConfigError(f"--eval_ema: {location} holds no EMA weights ('model_ema'); it was not trained with "
                          "--model_ema. Drop --eval_ema to evaluate its model")
    return {**checkpoint, "model": checkpoint["model_ema"]}
